"""SplitCLIP exactness: prefix + suffix == encode == open_clip's own encoders, for every cut."""

import pytest
import safetensors.torch
import torch
import torch.nn.functional as F

import clipib
from clipib.models.split import TimmImageTower, UnsupportedModelError


def _reference(clip, images, ids):
    m = clip.model
    return F.normalize(m.encode_image(images), dim=-1), F.normalize(m.encode_text(ids), dim=-1)


def _check_all_cuts(clip, images, ids, ks=None):
    ref_img, ref_txt = _reference(clip, images, ids)
    for tower, x, ref in ((clip.image, images, ref_img), (clip.text, ids, ref_txt)):
        torch.testing.assert_close(tower.encode(x), ref, atol=1e-5, rtol=0)
        for k in ks or range(tower.n_layers + 1):
            h = tower.prefix(x, k)
            assert h.ndim == 3 and h.shape[0] == x.shape[0]
            torch.testing.assert_close(tower.suffix(h, k, x), ref, atol=1e-5, rtol=0)


def test_tiny_every_cut(tiny_clip, pairs):
    images, ids = pairs
    _check_all_cuts(tiny_clip, images, ids)
    # text runs on the longest SOT..EOT only
    assert tiny_clip.text.prefix(ids, 1).shape[1] == int(tiny_clip.text.eot_positions(ids).max()) + 1


@torch.no_grad()
def test_vit_b32_every_cut():
    torch.manual_seed(0)
    clip = clipib.load_clip("ViT-B-32-quickgelu", pretrained=None)
    assert clip.grid == (7, 7) and clip.image.n_layers == 12 and clip.text.n_layers == 12
    images = torch.randn(1, 3, 224, 224).expand(2, -1, -1, -1)  # batch of 2, one image's compute per cut
    ids = clip.tokenize(["a dog", "a photograph of two cats sleeping on a red sofa in the sun"])
    _check_all_cuts(clip, images, ids)


@torch.no_grad()
def test_vit_b16_grid_from_model():
    torch.manual_seed(0)
    clip = clipib.load_clip("ViT-B-16", pretrained=None)
    assert clip.grid == (14, 14)
    _check_all_cuts(clip, torch.randn(1, 3, 224, 224), clip.tokenize(["a cat"]), ks=[0, 6, 12])


def test_attention_hook_path_is_exact(tiny_clip, pairs):
    images, ids = pairs
    seen = []

    def hook(i, attn):
        seen.append((i, attn.shape))
        torch.testing.assert_close(attn.sum(-1), torch.ones_like(attn.sum(-1)))
        return attn

    for tower, x in ((tiny_clip.image, images), (tiny_clip.text, ids)):
        ref = tower.encode(x)
        torch.testing.assert_close(tower.suffix(tower.prefix(x, 1), 1, x, attn_hook=hook), ref, atol=1e-5, rtol=0)
    assert [i for i, _ in seen] == [1, 2, 1, 2]


def test_encode_embeddings_matches_encode(tiny_clip, pairs):
    _, ids = pairs
    text = tiny_clip.text
    out = text.encode_embeddings(text.token_embeddings(ids), text.eot_positions(ids))
    torch.testing.assert_close(out, text.encode(ids), atol=1e-5, rtol=0)


def test_frozen_eval(tiny_clip):
    assert not any(p.requires_grad for p in tiny_clip.parameters())
    tiny_clip.train()
    assert not tiny_clip.model.training


def test_local_checkpoints(tmp_path, tiny_clip, tiny_config, pairs):
    images, ids = pairs

    state = tiny_clip.model.state_dict()
    st = tmp_path / "w.safetensors"
    safetensors.torch.save_file({k: v.contiguous() for k, v in state.items()}, str(st))
    pt = tmp_path / "w.pt"
    torch.save(state, pt)
    for path in (st, pt):
        clip = clipib.load_clip(tiny_config, pretrained=str(path))
        torch.testing.assert_close(clip.similarity(images, ids), tiny_clip.similarity(images, ids))
    # a pickle that is not a plain state dict is refused, never executed
    evil = tmp_path / "evil.pt"
    torch.save({"state_dict": {"x": object()}}, evil)
    with pytest.raises(clipib.ModelLoadError):
        clipib.load_clip(tiny_config, pretrained=str(evil))


def test_bad_models():
    with pytest.raises(clipib.ModelLoadError, match="unknown model"):
        clipib.load_clip("no-such-model", pretrained=None)
    with pytest.raises(clipib.ModelLoadError, match="neither a file nor a known"):
        clipib.load_clip("ViT-B-32-quickgelu", pretrained="no-such-tag")
    with pytest.raises(UnsupportedModelError):
        clipib.load_clip("RN50", pretrained=None)


def test_offline_tag_is_one_clear_error(monkeypatch):
    import clipib.models.loading as loading

    monkeypatch.setattr(loading, "_hub_reachable", lambda *a, **k: False)
    with pytest.raises(clipib.ModelLoadError, match="--pretrained PATH"):
        clipib.load_clip("ViT-B-32-quickgelu", pretrained="openai")


def test_truncation_warns(tiny_clip):
    with pytest.warns(UserWarning, match="truncated"):
        ids = tiny_clip.tokenize(["word " * 100])
    assert int(tiny_clip.text.eot_positions(ids)[0]) == tiny_clip.context_length - 1


def test_loading_keeps_other_loggers(tiny_config, caplog):
    """Loading silences open_clip's own records only: the process's other loggers keep logging meanwhile."""
    import logging

    from clipib.models import loading

    caplog.set_level(logging.INFO)
    with loading._quiet(offline=True):
        logging.getLogger("my_experiment").warning("still heard")
        logging.info("root records of the user's code too")
    assert [r.getMessage() for r in caplog.records] == ["still heard", "root records of the user's code too"]
    assert logging.root.manager.disable == logging.NOTSET
    clipib.load_clip(tiny_config, pretrained=None)
    logging.getLogger("my_experiment").warning("after")
    assert caplog.records[-1].getMessage() == "after"


# --- timm towers, bidirectional text towers --------------------------------------------------------------
FAMILIES = ["coca", "eva", "pe", "siglip"]


def _hook_is_exact(clip, images, ids):
    """The explicit-attention path gives the same embeddings and passes row-stochastic probabilities."""
    for tower, x in ((clip.image, images), (clip.text, ids)):
        seen = []

        def hook(i, attn):
            seen.append(i)
            assert attn.ndim == 4 and attn.shape[-1] == attn.shape[-2]
            torch.testing.assert_close(attn.sum(-1), torch.ones_like(attn.sum(-1)))
            return attn

        k = tower.n_layers - 2
        out = tower.suffix(tower.prefix(x, k), k, x, attn_hook=hook)
        torch.testing.assert_close(out, tower.encode(x), atol=1e-5, rtol=0)
        assert seen == list(range(k, tower.n_layers))


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_tiny_families_every_cut(tiny_family, family_pairs, family):
    clip = tiny_family(family)
    images, ids = family_pairs(clip)
    with torch.no_grad():
        _check_all_cuts(clip, images, ids)
    _hook_is_exact(clip, images, ids)
    w = clip.image.pool_weights(images)  # [B, T]
    assert w.shape == (4, clip.image.n_prefix + clip.grid[0] * clip.grid[1])
    torch.testing.assert_close(w.sum(-1), torch.ones(4))
    assert clip.image.to_grid(w).shape == (4, *clip.grid)


@pytest.mark.parametrize("family", ["coca", "pe", "siglip"])
def test_attention_pool_is_the_head(tiny_family, family_pairs, family):
    """``ImageTower.attention_pool`` (the MAP head with its attention explicit) is ``head`` with the final norm,
    something else without it; its hook sees the head's probabilities over the rows it reads."""
    clip = tiny_family(family)
    images, _ = family_pairs(clip)
    tower = clip.image
    with torch.no_grad():
        h = tower.prefix(images[:2], tower.n_layers)
        seen = []
        emb = tower.attention_pool(h, attn_hook=lambda i, a: seen.append((i, a)) or a)
        torch.testing.assert_close(emb, tower.head(h, images[:2]), atol=1e-5, rtol=0)
        raw = tower.attention_pool(h, final_norm=False, normalize=False)
    (index, probs), = seen
    assert index == tower.n_layers and probs.shape[0] == 2 and probs.shape[-1] == h.shape[1]
    torch.testing.assert_close(probs.sum(-1), torch.ones_like(probs.sum(-1)))
    assert (F.normalize(raw, dim=-1) - emb).abs().max() > 1e-4
    with pytest.raises(UnsupportedModelError):
        tower.mean_token_embedding(h)


def test_siglip_text_rules(tiny_family, make_siglip_ids):
    """A bidirectional last-pooled tower: pooled at the last position, runs on the whole context (padding
    changes the embedding), spans end at the first padding EOS and have no SOT."""
    clip = tiny_family("siglip")
    text = clip.text
    assert not text.causal and text.pool_type == "last" and text.content_start == 0
    ids = make_siglip_ids([3, 15], clip.context_length, 1000)
    assert text.eot_positions(ids).tolist() == [15, 15]
    assert text.caption_ends(ids).tolist() == [3, 15]
    assert text.span_mask(ids)[0].nonzero().flatten().tolist() == [0, 1, 2, 3]
    assert text.span_mask(ids, special=False)[0].nonzero().flatten().tolist() == [0, 1, 2]
    assert text.prefix(ids, 1).shape[1] == clip.context_length
    assert clip.image.pool_type == "map" and clip.image.n_prefix == 0
    other = ids.clone()
    other[0, 10] = 7  # a change past the caption still moves a bidirectional tower's embedding
    assert not torch.allclose(text.encode(ids)[0], text.encode(other)[0])


@pytest.mark.slow
@torch.no_grad()
def test_open_clip_coca_every_cut():
    """open_clip's coca_ViT-B-32 on random weights: its contrastive towers (attentional pooler; class token after
    the context, padding mask) at every cut, and the token-embedding path, against open_clip's encoders."""
    clip = _big("coca_ViT-B-32")
    images, ids = torch.randn(1, 3, *clip.image_size), _synthetic_ids(clip, [4, 11])
    _check_all_cuts(clip, images[:1].expand(2, -1, -1, -1), ids)
    ref = F.normalize(clip.model.encode_text(ids), dim=-1)
    emb = clip.text.encode_embeddings(clip.text.token_embeddings(ids), clip.text.eot_positions(ids), ids)
    torch.testing.assert_close(emb, ref, atol=1e-5, rtol=0)


def test_coca_text_rules(tiny_family, family_pairs):
    """CoCa's text tower: pooled at its class token after the context, spans end at the caption's EOT, the
    padding keys are masked (a pad id turned into a word moves the embedding; a change is not needed to be
    seen past a masked key), and the mask needs the ids."""
    clip = tiny_family("coca")
    text = clip.text
    _, ids = family_pairs(clip)
    ctx = clip.context_length
    assert ctx == 76 and text.causal and text.pad_mask and clip.image.pool_type == "map"
    assert text.eot_positions(ids).tolist() == [ctx] * 4
    assert text.caption_ends(ids).tolist() == ids.argmax(-1).tolist()
    assert text.prefix(ids, 1).shape[1] == ctx + 1
    assert text.valid_length(ids) == ctx
    with pytest.raises(ValueError, match="pass the ids"):
        text.run(text.prefix(ids, 0), 0, 1)
    padded = ids.clone()
    end = int(text.caption_ends(ids[:1])[0])
    padded[0, end + 3] = 5  # a padding position turned into a word: no longer masked for the class token
    assert not torch.allclose(text.encode(ids)[0], text.encode(padded)[0])
    assert clip.token_strings(ids[0])[-1] == clip.token_strings(ids[0])[-1] and len(clip.token_strings(ids[0])) == end + 1


def test_family_tower_kinds(tiny_family):
    assert (tiny_family("eva").image.pool_type, tiny_family("eva").image.n_prefix) == ("tok", 1)
    assert (tiny_family("pe").image.pool_type, tiny_family("pe").image.n_prefix) == ("map", 1)


def test_tokenizer_is_lazy(tiny_config):
    """A model whose tokenizer cannot be built loads; the first use says in one line what is missing."""
    from clipib.models.loading import LazyTokenizer

    tok = LazyTokenizer("ViT-B-16-SigLIP")
    try:
        import transformers  # noqa: F401
    except ModuleNotFoundError:
        with pytest.raises(clipib.ModelLoadError, match="needs the 'transformers' package"):
            tok(["a cat"])
    assert clipib.load_clip(tiny_config, pretrained=None).tokenize(["a cat"]).shape == (1, 77)


def _big(name):
    torch.manual_seed(0)
    return clipib.load_clip(name, pretrained=None)


def _synthetic_ids(clip, lengths):
    """CLIP BPE-shaped ids (SOT, words, EOT, zeros) or SigLIP-shaped ones (words, EOS = 1 padding), no tokenizer."""
    vocab = clip.text.token_embedding.num_embeddings
    if clip.text.pool_type == "last":
        ids = torch.ones(len(lengths), clip.context_length, dtype=torch.long)
        for row, n in enumerate(lengths):
            ids[row, :n] = torch.randint(2, vocab, (n,), generator=torch.Generator().manual_seed(row))
        return ids
    ids = torch.zeros(len(lengths), clip.context_length, dtype=torch.long)
    gen = torch.Generator().manual_seed(3)
    for row, n in enumerate(lengths):
        ids[row, 0], ids[row, 1:n + 1], ids[row, n + 1] = vocab - 2, torch.randint(1, vocab - 2, (n,), generator=gen), vocab - 1
    return ids


@pytest.mark.slow
@pytest.mark.parametrize("name", ["ViT-B-16-SigLIP", "ViT-B-16-SigLIP2", "EVA02-B-16", "PE-Core-B-16"])
@torch.no_grad()
def test_open_clip_timm_models_every_cut(name):
    """open_clip's own configs on random weights (one image, two captions): every cut of the timm image tower
    and of a bidirectional (SigLIP) text tower; first / middle / last cut of a causal CLIP text tower (the code
    path ViT-B-32 checks at every cut above; PE-Core's 24-block text tower would triple the time)."""
    clip = _big(name)
    assert isinstance(clip.image, TimmImageTower)
    images, ids = torch.randn(1, 3, *clip.image_size), _synthetic_ids(clip, [4, 11])
    ref_img, ref_txt = _reference(clip, images, ids)
    n_txt = clip.text.n_layers
    text_ks = range(n_txt + 1) if not clip.text.causal else (0, n_txt // 2, n_txt)
    for tower, x, ref, ks in ((clip.image, images, ref_img, range(clip.image.n_layers + 1)),
                              (clip.text, ids, ref_txt, text_ks)):
        torch.testing.assert_close(tower.encode(x), ref, atol=1e-5, rtol=0)
        for k in ks:
            torch.testing.assert_close(tower.suffix(tower.prefix(x, k), k, x), ref, atol=1e-5, rtol=0)


@pytest.mark.slow
@pytest.mark.parametrize("name, kind", [("convnext_tiny", "ConvNeXt"), ("MobileCLIP-S1", "FastVit")])
def test_unsplittable_towers_are_named(name, kind):
    """Towers clipib cannot split are refused with a message naming the tower type (docs/models.md)."""
    with pytest.raises((UnsupportedModelError, clipib.ModelLoadError), match=kind):
        clipib.load_clip(name, pretrained=None)


@pytest.mark.parametrize("family", ["siglip", "tiny"])
def test_qk_hook_gives_what_the_attention_compares(tiny_family, tiny_clip, pairs, family_pairs, family):
    """softmax(q·kᵀ/√d (+ mask)) of the queries and keys ``Tower.run`` reports equals the probabilities the
    attention hook sees (timm taps ``q_norm`` / ``k_norm``; open_clip's explicit path)."""
    clip = tiny_clip if family == "tiny" else tiny_family(family)
    images, ids = pairs if family == "tiny" else family_pairs(clip)
    for tower, x in ((clip.image, images), (clip.text, ids)):
        probs, qk = {}, {}
        h = tower.prefix(x, 1)
        out = tower.run(h, 1, 2, attn_hook=lambda i, a: probs.setdefault(i, a),
                        qk_hook=lambda i, q, k: qk.setdefault(i, (q, k)))
        torch.testing.assert_close(out, tower.prefix(x, 2), atol=1e-5, rtol=0)
        q, k = qk[1]  # [B, heads, T, d]
        logits = q @ k.transpose(-1, -2) * q.shape[-1] ** -0.5
        mask = tower._mask(h.shape[1])
        if mask is not None:
            logits = logits + mask
        torch.testing.assert_close(logits.softmax(-1), probs[1], atol=1e-5, rtol=0)


def _raw_is_open_clips(clip, images, ids):
    """``normalize=False`` (AdaIB's ``embeddings="raw"``): open_clip's un-normalised embeddings, at every entry point."""
    m = clip.model
    for tower, x, ref in ((clip.image, images, m.encode_image(images, normalize=False)),
                         (clip.text, ids, m.encode_text(ids, normalize=False))):
        assert not torch.allclose(ref.norm(dim=-1), torch.ones(ref.shape[0]), atol=1e-3)
        torch.testing.assert_close(tower.encode(x, normalize=False), ref, atol=1e-4, rtol=1e-5)
        k = tower.n_layers - 1
        for pooled in (False, True):
            out = tower.suffix(tower.prefix(x, k), k, x, pooled_only=pooled, normalize=False)
            torch.testing.assert_close(out, ref, atol=1e-4, rtol=1e-5)


@torch.no_grad()
@pytest.mark.parametrize("family", ["clip"] + sorted(FAMILIES))
def test_unnormalised_embeddings(tiny_family, family_pairs, tiny_clip, pairs, family):
    if family == "clip":
        _raw_is_open_clips(tiny_clip, *pairs)
    else:
        clip = tiny_family(family)
        _raw_is_open_clips(clip, *family_pairs(clip))
