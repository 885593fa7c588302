"""Shared fixtures: a tiny random-weight CLIP (tests/data/tiny-clip.json) and a few pairs; one tiny model per
tower family (tests/data/tiny-{siglip,eva,pe}.json, on tiny timm trunks registered here: ``clipib_tiny_siglip``
= timm ViT without class token, MAP head; ``clipib_tiny_eva`` = EVA-02 (RoPE, SwiGLU, token pooling);
``clipib_tiny_pe`` = PE-Core (RoPE attention, norm_pre, MAP); 32 px, patch 8, width 64, 3 blocks).
"""

from pathlib import Path

import pytest
import torch

from hypothesis import settings as hypothesis_settings
from timm.models import register_model
from timm.models.eva import Eva
from timm.models.vision_transformer import VisionTransformer

import clipib

DATA = Path(__file__).parent / "data"
TINY = str(DATA / "tiny-clip.json")
CAPTIONS = ["a red circle", "there is a purple triangle in the picture", "a photo of a dog", "look"]

torch.set_num_threads(min(2, torch.get_num_threads()))
# property tests (hypothesis) draw the same examples on every run: CI is never red by the luck of a draw
hypothesis_settings.register_profile("clipib", derandomize=True, print_blob=True)
hypothesis_settings.load_profile("clipib")


@pytest.fixture(scope="session")
def tiny_config() -> str:
    """Path of the tiny open_clip model config (for ``--model`` on command lines and ``load_clip``)."""
    return TINY


@pytest.fixture(scope="session")
def tiny_clip() -> clipib.SplitCLIP:
    """3-block towers, 32 px, patch 8 (4x4 grid), width 64, random weights (seed 0)."""
    torch.manual_seed(0)
    return clipib.load_clip(TINY, pretrained=None)


@pytest.fixture(scope="session")
def pairs(tiny_clip):
    """Four (image, ids) pairs with captions of different lengths."""
    gen = torch.Generator().manual_seed(1)
    images = torch.randn(4, 3, *tiny_clip.image_size, generator=gen)
    return images, tiny_clip.tokenize(CAPTIONS)


@pytest.fixture(scope="session")
def labelled_batch(pairs):
    """The :func:`pairs` as an eval batch with ground truth: an object box (rows 4-11, columns 8-19), the first
    content token as the gold token, every pair matched."""
    images, ids = pairs
    n = images.shape[0]
    mask = torch.zeros(n, *images.shape[-2:], dtype=torch.bool)
    mask[:, 4:12, 8:20] = True
    gold = torch.zeros_like(ids, dtype=torch.bool)
    gold[:, 1] = True
    return {"image": images, "ids": ids, "key": [f"k{i}" for i in range(n)], "caption": [""] * n,
            "mask": mask, "gold_tokens": gold, "matched": torch.ones(n, dtype=torch.bool)}



# --- tower families: tiny timm trunks registered with timm, named by tests/data/tiny-{siglip,eva,pe}.json ---

_COMMON = dict(img_size=32, patch_size=8, embed_dim=64, depth=3, num_heads=4)


def _clean(kwargs: dict) -> dict:
    return {k: v for k, v in kwargs.items() if not k.startswith("pretrained_cfg") and k != "cache_dir"}


@register_model
def clipib_tiny_siglip(pretrained: bool = False, **kwargs) -> VisionTransformer:
    """SigLIP-style tiny ViT."""
    return VisionTransformer(**dict(dict(_COMMON, class_token=False, global_pool="map"), **_clean(kwargs)))


@register_model
def clipib_tiny_eva(pretrained: bool = False, **kwargs) -> Eva:
    """EVA-02-style tiny trunk."""
    args = dict(_COMMON, qkv_fused=False, mlp_ratio=4 * 2 / 3, swiglu_mlp=True, scale_mlp=True,
                scale_attn_inner=True, use_rot_pos_emb=True, ref_feat_shape=(4, 4))
    return Eva(**dict(args, **_clean(kwargs)))


@register_model
def clipib_tiny_pe(pretrained: bool = False, **kwargs) -> Eva:
    """PE-Core-style tiny trunk."""
    args = dict(_COMMON, attn_type="rope", use_pre_transformer_norm=True, use_rot_pos_emb=True,
                ref_feat_shape=(4, 4), rope_grid_offset=1.0, rope_grid_indexing="xy", attn_pool_num_heads=4)
    return Eva(**dict(args, **_clean(kwargs)))


FAMILIES = {name: str(DATA / f"tiny-{name}.json") for name in ("siglip", "eva", "pe", "coca")}
"""One tiny JSON config per tower family: timm ViT + MAP head with a bidirectional last-pooled text tower
(SigLIP), EVA-02 (RoPE, token pooling), PE-Core (RoPE, norm_pre, MAP), CoCa (open_clip ViT with an attentional
pooler; causal text tower with a padding mask that pools a class token appended after the context)."""


def siglip_ids(lengths, context: int, vocab: int, seed: int = 2) -> torch.Tensor:
    """SigLIP-shaped synthetic ids ``[B, context]``: ``n`` word ids (no SOT) then EOS = 1 repeated as padding,
    as SigLIP's tokenizer pads (no tokenizer download needed)."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.ones(len(lengths), context, dtype=torch.long)
    for row, n in enumerate(lengths):
        ids[row, :n] = torch.randint(2, vocab, (n,), generator=gen)
    return ids


@pytest.fixture(scope="session")
def tiny_family():
    """``name -> SplitCLIP`` for :data:`FAMILIES` (random weights, seed 0), built on first use."""
    cache = {}

    def get(name: str) -> clipib.SplitCLIP:
        if name not in cache:
            torch.manual_seed(0)
            cache[name] = clipib.load_clip(FAMILIES[name], pretrained=None)
        return cache[name]

    return get


@pytest.fixture(scope="session")
def family_pairs():
    """``clip -> (images [4, 3, H, W], ids [4, ctx])`` for a family model."""
    return _family_pairs


@pytest.fixture(scope="session")
def make_siglip_ids():
    """:func:`siglip_ids`."""
    return siglip_ids


def _family_pairs(clip: clipib.SplitCLIP):
    """Four pairs for a family model: SigLIP-shaped ids for a last-pooled tower, CLIP BPE ids otherwise."""
    gen = torch.Generator().manual_seed(1)
    images = torch.randn(4, 3, *clip.image_size, generator=gen)
    if clip.text.pool_type == "last":
        return images, siglip_ids([3, 8, 5, 1], clip.context_length, clip.text.token_embedding.num_embeddings)
    return images, clip.tokenize(CAPTIONS)
