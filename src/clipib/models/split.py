"""SplitCLIP: an open_clip CLIP whose towers can be cut after any transformer block.

This is the only module that touches open_clip and timm internals (``_embeds``, ``resblocks``, ``_pool``, the
text tower's attributes; a ``TimmModel``'s ViT / EVA trunk: ``patch_embed``, ``_pos_embed``, rotary
embeddings, ``blocks``, ``pool``). Supported: open_clip ``VisionTransformer`` towers (CLS, mean or CoCa's
attentional pooling) and
timm ``VisionTransformer`` / ``Eva`` trunks inside ``TimmModel`` (SigLIP, SigLIP 2, EVA-02, PE-Core: class and
register tokens, ``norm_pre``, RoPE, pooling ``map`` / ``avg`` / ``token``); open_clip ``TextTransformer``
towers, causal or not, pooled ``argmax`` / ``eos`` / ``last`` / ``first`` or at CoCa's appended class token. ``tower.suffix(tower.prefix(x, k), k, x) == tower.encode(x)`` for every ``k`` is
guarded by ``tests/test_split.py`` against open_clip's own ``encode_image`` / ``encode_text``.

Layer index convention (REFERENCE_NOTES §0): ``k`` is the residual stream after ``k`` blocks; ``0`` is the
output of the embedding stage (after ``ln_pre`` on the vision tower), ``n_layers`` the input of the final
LayerNorm.
"""

from __future__ import annotations

import contextlib
import copy
import warnings
from dataclasses import dataclass
from typing import Callable, Iterator, List, Mapping, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from open_clip.constants import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD
from open_clip.coca_model import CoCa
from open_clip.model import CLIP, CustomTextCLIP
from open_clip.timm_model import TimmModel
from open_clip.transformer import ResidualAttentionBlock, TextTransformer, VisionTransformer
from torch import Tensor, nn

from clipib.models.passes import active_cache

AttnHook = Callable[[int, Tensor], Tensor]
"""``hook(block_index, attn_probs [B, heads, T, T]) -> attn_probs`` used by :meth:`Tower.suffix`."""
QKHook = Callable[[int, Tensor, Tensor], None]
"""``hook(block_index, q [B, heads, T, d], k [B, heads, T, d])``: a block's queries and keys (see :meth:`Tower.run`)."""


def token_span(eot: Tensor, length: int, special: bool = True, start: int = 1) -> Tensor:
    """``[B, length]`` bool: True on SOT..EOT of each row (``special=False``: ``start``..EOT, EOT excluded).

    ``eot`` ``[B]`` holds each row's EOT position (:meth:`TextTower.eot_positions`); SOT is position 0;
    ``start`` is the first content token (1 after a SOT; 0 for tokenizers without one, e.g. SigLIP's).
    The one token-span rule of clipib: methods mask outside SOT..EOT, perturbation methods and metrics
    act on the content tokens between them.

    >>> token_span(torch.tensor([3]), 5).int()
    tensor([[1, 1, 1, 1, 0]], dtype=torch.int32)
    >>> token_span(torch.tensor([3]), 5, special=False).int()
    tensor([[0, 1, 1, 0, 0]], dtype=torch.int32)
    """
    pos = torch.arange(length, device=eot.device)[None]  # [1, L]
    if special:
        return pos <= eot[:, None]
    return (pos >= start) & (pos < eot[:, None])


def fit_rows(mask: Tensor, length: int) -> Tensor:
    """A ``[B, L]`` per-token mask over ids cut or padded (with False) to ``length`` stream rows: causal towers
    run on fewer rows than the context, CoCa's on one more (its class token, not a caption token).

    >>> fit_rows(torch.tensor([[True, True, False]]), 4).int()
    tensor([[1, 1, 0, 0]], dtype=torch.int32)
    """
    if mask.shape[1] >= length:
        return mask[:, :length]
    return torch.cat([mask, mask.new_zeros(mask.shape[0], length - mask.shape[1])], 1)


@dataclass(frozen=True)
class CaptionTokens:
    """Where a caption sits in the fixed-length ids of a tokenizer that feeds a ``last`` / ``first``-pooled text
    tower (no EOT to ``argmax`` for): what :meth:`TextTower.caption_ends` / ``content_start`` read.

    ``sot``: position 0 holds a start token (BERT's ``[CLS]``), not the first word. ``ends``: the ids that close a
    caption and pad it (EOS, padding); the caption's EOS is the first position of the trailing run of these ids.
    Empty ``ends``: the trailing run of each row's own final id (a tokenizer that pads with its EOS).
    """

    sot: bool = False
    ends: Tuple[int, ...] = ()


SIGLIP_T5_TOKENS = CaptionTokens(sot=False, ends=(1,))
"""SigLIP (c4-en / mc4 T5 sentencepiece, open_clip ``timm/ViT-*-SigLIP*``): no BOS, words, then ``</s>`` = 1 as EOS
*and* padding (big_vision ``tokenize(eos="sticky", pad_value=1)``; open_clip's ``SigLipTokenizer`` sets
``pad_token_id = 1``): ``[w…, 1, 1, …]``, truncated ``[w₁…w₆₃, 1]``."""
SIGLIP2_GEMMA_TOKENS = CaptionTokens(sot=False, ends=(1, 0))
"""SigLIP 2 (Gemma tokenizer, open_clip ``timm/ViT-*-SigLIP2*``): no BOS, words, ``<eos>`` = 1, then ``<pad>`` = 0
(big_vision ``tok(model="gemma", bos="no", eos="sticky")`` pads with the tokenizer's pad id; open_clip's
``SigLipTokenizer``: ``GemmaTokenizerFast(add_bos_token=False, add_eos_token=True)``, ``pad_token_id = 0``):
``[w…, 1, 0, 0, …]``, truncated ``[w₁…w₆₃, 1]``."""
BERT_TOKENS = CaptionTokens(sot=True, ends=(0, 102))
"""``bert-base-uncased`` (CLIPA): ``[CLS]`` = 101, words, ``[SEP]`` = 102 (written as 0 under open_clip's
``strip_sep_token``), ``[PAD]`` = 0."""


def caption_tokens(text_cfg: Mapping, name: str = "") -> Optional[CaptionTokens]:
    """The :class:`CaptionTokens` of an open_clip ``text_cfg`` whose tokenizer clipib knows (by
    ``hf_tokenizer_name``, or, without one, by the model ``name`` as open_clip's ``get_tokenizer`` picks its
    SigLIP tokenizer), else None (:meth:`TextTower.caption_ends` then reads the trailing run of the final id).

    >>> caption_tokens({"hf_tokenizer_name": "timm/ViT-B-16-SigLIP2"}) == SIGLIP2_GEMMA_TOKENS
    True
    """
    tok = str(text_cfg.get("hf_tokenizer_name") or name).lower()
    if "siglip2" in tok:
        return SIGLIP2_GEMMA_TOKENS
    if "siglip" in tok:
        return SIGLIP_T5_TOKENS
    if tok.startswith("bert-base"):
        return BERT_TOKENS
    return None


class UnsupportedModelError(ValueError):
    """The model is not a CLIP-style ViT + transformer text tower that clipib can split."""


def _run_block(block: nn.Module, x: Tensor, mask: Optional[Tensor], index: int, hook: Optional[AttnHook],
               qk_hook: Optional[QKHook] = None) -> Tensor:
    """One residual block; with ``hook``, attention is computed explicitly so its probabilities are in the graph."""
    if hook is None and qk_hook is None:
        if mask is not None and mask.ndim == 4:  # per-sample [B, 1, T, T] -> nn.MultiheadAttention's [B·heads, T, T]
            mask = mask.expand(-1, block.attn.num_heads, -1, -1).flatten(0, 1)
        return block(x, attn_mask=mask)
    hook = hook or (lambda i, a: a)
    if not isinstance(block, ResidualAttentionBlock) or not block.attn.batch_first:
        raise UnsupportedModelError("attention hooks need open_clip's default ResidualAttentionBlock")
    mha: nn.MultiheadAttention = block.attn
    y = block.ln_1(x)  # [B, T, D]
    b, t, d = y.shape
    heads = mha.num_heads
    q, k, v = F.linear(y, mha.in_proj_weight, mha.in_proj_bias).chunk(3, dim=-1)
    q, k, v = (u.reshape(b, t, heads, d // heads).transpose(1, 2) for u in (q, k, v))  # [B, H, T, d/H]
    if qk_hook is not None:
        qk_hook(index, q, k)
    logits = q @ k.transpose(-1, -2) * (d // heads) ** -0.5  # [B, H, T, T]
    if mask is not None:
        logits = logits + mask.to(logits.dtype)
    attn = hook(index, logits.softmax(dim=-1))
    out = (attn @ v).transpose(1, 2).reshape(b, t, d)
    x = x + block.ls_1(mha.out_proj(out))
    return x + block.ls_2(block.mlp(block.ln_2(x)))


def _pooled_row_block(block: nn.Module, h: Tensor, rows: Tensor, mask: Optional[Tensor]) -> Tensor:
    """``block`` evaluated at one row per sample (``rows`` ``[B]``), keys and values from every row: the
    ``[B, 1, D]`` output at those rows, equal to ``block(h)[arange(B), rows]`` (pre-LN block)."""
    y = block.ln_1(h)  # [B, T, D]
    idx = torch.arange(h.shape[0], device=h.device)
    query = y[idx, rows][:, None]  # [B, 1, D]
    rows_mask = None if mask is None else mask[rows][:, None].repeat_interleave(block.attn.num_heads, 0)  # [B·H, 1, T]
    x = h[idx, rows][:, None] + block.ls_1(block.attention(q_x=query, k_x=y, v_x=y, attn_mask=rows_mask))
    return x + block.ls_2(block.mlp(block.ln_2(x)))  # [B, 1, D]


class Tower(nn.Module):
    """Common interface of the image and text towers."""

    blocks: nn.ModuleList

    @property
    def n_layers(self) -> int:
        """Number of transformer blocks."""
        return len(self.blocks)

    def _mask(self, length: int, x: Optional[Tensor] = None) -> Optional[Tensor]:
        """The additive attention mask of a ``length``-row stream: ``[T, T]``, or ``[B, 1, T, T]`` when it
        depends on the input ``x`` (padding masks), or None."""
        return None

    def projection_parameters(self) -> List[nn.Parameter]:
        """The parameters of the projection into the shared embedding space (empty when the tower has none)."""
        raise NotImplementedError

    def _check_k(self, k: int) -> None:
        if not 0 <= k <= self.n_layers:
            raise ValueError(f"layer k={k} outside 0..{self.n_layers}")

    def _blocks(self, h: Tensor, start: int, stop: int, hook: Optional[AttnHook] = None,
                qk_hook: Optional[QKHook] = None, x: Optional[Tensor] = None) -> Tensor:
        mask = self._mask(h.shape[1], x)
        for i in range(start, stop):
            h = _run_block(self.blocks[i], h, mask, i, hook, qk_hook)
        return h

    def run(self, h: Tensor, start: int, stop: int, attn_hook: Optional[AttnHook] = None,
            qk_hook: Optional[QKHook] = None, x: Optional[Tensor] = None) -> Tensor:
        """Blocks ``start..stop−1`` on the residual stream ``h`` after ``start`` blocks: the stream after ``stop``
        blocks ``[B, T, D]``. ``attn_hook`` as in :meth:`suffix`; ``qk_hook`` sees each block's queries and keys
        as the attention compares them (timm RoPE towers: before the rotary embedding). ``x``: the tower's input
        rows aligned with ``h``; needed by text towers that mask padding (CoCa), ignored otherwise."""
        if not 0 <= start <= stop <= self.n_layers:
            raise ValueError(f"blocks {start}..{stop} outside 0..{self.n_layers}")
        return self._blocks(h, start, stop, attn_hook, qk_hook, x)

    def embed(self, x: Tensor) -> Tensor:
        """The residual stream before the first block, ``[B, T, D]``."""
        raise NotImplementedError

    def head(self, h: Tensor, x: Tensor, normalize: bool = True) -> Tensor:
        """Final norm, pooling and projection of the last residual stream, L2-normalised ``[B, E]``
        (``normalize=False``: the projected embedding before the L2 normalisation)."""
        raise NotImplementedError

    def prefix(self, x: Tensor, k: int) -> Tensor:
        """Residual stream after ``k`` blocks, ``[B, T, D]`` (shared inside a :class:`~clipib.models.passes.PassCache`)."""
        self._check_k(k)
        cache = active_cache()
        if cache is not None:
            return cache.prefix(self, x, k)
        return self._blocks(self.embed(x), 0, k, x=x)

    def pooled_rows(self, x: Tensor) -> Optional[Tensor]:
        """The one row ``[B]`` the head reads from the last residual stream, or None if it reads several."""
        return None

    def head_pooled(self, h: Tensor, x: Tensor, normalize: bool = True) -> Tensor:
        """:meth:`head` of a last residual stream reduced to its pooled row, ``[B, 1, D]``."""
        raise NotImplementedError

    def suffix(self, h: Tensor, k: int, x: Tensor, attn_hook: Optional[AttnHook] = None,
               pooled_only: bool = False, normalize: bool = True) -> Tensor:
        """Run blocks ``k..n_layers`` on ``h`` and return the L2-normalised embedding ``[B, E]``.

        ``x`` is the tower's input (its rows aligned with ``h``'s); the text tower reads EOT positions from it.
        ``attn_hook`` computes attention explicitly and passes its probabilities through the hook.
        ``pooled_only`` evaluates the last block at the pooled row only (CLS / EOT; keys and values from every
        row): the same embedding up to float rounding for a fraction of the last block's FLOPs. Ignored with
        ``attn_hook``, at ``k == n_layers`` and for towers whose head reads several rows.
        ``normalize=False`` returns the projected embedding before its L2 normalisation.
        """
        self._check_k(k)
        rows = self.pooled_rows(x) if pooled_only and attn_hook is None and k < self.n_layers else None
        last = self.blocks[-1] if self.n_layers else None
        if rows is None or not isinstance(last, ResidualAttentionBlock) or not last.attn.batch_first:
            return self.head(self._blocks(h, k, self.n_layers, attn_hook, x=x), x, normalize)
        h = self._blocks(h, k, self.n_layers - 1, x=x)
        return self.head_pooled(_pooled_row_block(last, h, rows, self._mask(h.shape[1], x)), x, normalize)

    def encode(self, x: Tensor, normalize: bool = True) -> Tensor:
        """L2-normalised embedding ``[B, E]`` (``normalize=False``: before the L2 normalisation); a normalised one
        is shared inside a :class:`~clipib.models.passes.PassCache`."""
        cache = active_cache()
        if cache is not None and normalize:
            return cache.encode(self, x)
        return self.head(self._blocks(self.embed(x), 0, self.n_layers, x=x), x, normalize)


class ImageTower(Tower):
    """The vision tower of an open_clip ``VisionTransformer``; token 0 is CLS, then the patch grid."""

    def __init__(self, visual: VisionTransformer) -> None:
        super().__init__()
        if not isinstance(visual, VisionTransformer):
            raise UnsupportedModelError(f"image tower {type(visual).__name__} is not an open_clip VisionTransformer")
        if visual.attn_pool is not None and getattr(visual, "attn_pool_type", "") not in ("", "parallel"):
            raise UnsupportedModelError(
                f"open_clip vision towers with '{visual.attn_pool_type}' attentional pooling are not supported "
                "(CoCa's original and 'parallel' poolers are)")
        self.visual = visual
        self.blocks = visual.transformer.resblocks

    @property
    def grid(self) -> Tuple[int, int]:
        """Patch grid ``(gh, gw)``."""
        return tuple(self.visual.grid_size)

    @property
    def image_size(self) -> Tuple[int, int]:
        """Input resolution ``(H, W)``."""
        return tuple(self.visual.image_size)

    @property
    def n_prefix(self) -> int:
        """Tokens before the patch grid in the residual stream (class and register tokens)."""
        return 1

    @property
    def pool_type(self) -> str:
        """How the embedding is read from the last residual stream: ``"tok"`` (the CLS token), ``"avg"`` (the
        mean of the patch tokens) or ``"map"`` (attention pooling over the tokens: timm's MAP head, CoCa's
        attentional pooler, whose first query is the contrastive embedding)."""
        return "map" if self.visual.attn_pool is not None else self.visual.pool_type

    def to_grid(self, scores: Tensor) -> Tensor:
        """Per-token scores ``[B, T]`` → the patch grid ``[B, gh, gw]`` (class / register tokens dropped)."""
        return scores[:, self.n_prefix:].reshape(-1, *self.grid)

    def pool_weights(self, x: Tensor) -> Tensor:
        """``[B, T]``: how much each row of the last residual stream enters the pooled vector (one-hot at CLS
        for ``tok``, uniform over the patches for ``avg``, the attention head's probabilities averaged over
        heads for ``map``); rows sum to 1. Methods that read "the pooled token's row" weight rows by this."""
        b, t = x.shape[0], self.n_prefix + self.grid[0] * self.grid[1]
        if getattr(self.visual, "attn_pool", None) is not None:  # CoCa (timm towers override for their MAP)
            return self._pooler_weights(self.prefix(x, self.n_layers))
        w = torch.zeros(b, t, device=x.device, dtype=x.dtype)
        if self.pool_type == "avg":
            w[:, self.n_prefix:] = 1.0 / (t - self.n_prefix)
        else:
            w[:, 0] = 1.0
        return w

    def _pooler_weights(self, h: Tensor) -> Tensor:
        """``[B, T]``: CoCa's attentional pooler, the attention of the query that becomes the contrastive
        embedding (query 0 of the original pooler, the one query of the 'parallel' contrastive pooler) over the
        last residual stream's rows, averaged over heads."""
        v = self.visual
        pool = v.attn_pool if v.attn_pool_contrastive is None else v.attn_pool_contrastive
        y = pool.ln_k(h if v.attn_pool_contrastive is None else v.ln_post(h))
        q = pool.ln_q(pool.query[:1]).unsqueeze(0).expand(h.shape[0], -1, -1)  # [B, 1, d]
        _, probs = pool.attn(q, y, y, need_weights=True, average_attn_weights=True)  # [B, 1, T]
        return probs[:, 0]

    def embed(self, x: Tensor) -> Tensor:
        return self.visual._embeds(x)  # [B, 1+N, D]

    def pooled_rows(self, x: Tensor) -> Optional[Tensor]:
        if self.pool_type != "tok":
            return None
        return torch.zeros(x.shape[0], dtype=torch.long, device=x.device)  # CLS

    def head_pooled(self, h: Tensor, x: Tensor, normalize: bool = True) -> Tensor:
        return self.head(h, x, normalize)  # 'tok' pooling reads row 0 of [B, 1, D]

    def projection_parameters(self) -> List[nn.Parameter]:
        return [] if self.visual.proj is None else [self.visual.proj]

    def head(self, h: Tensor, x: Tensor, normalize: bool = True) -> Tensor:
        pooled, _ = self.visual._pool(h)  # [B, D]
        return self._project(pooled, normalize)

    def _project(self, pooled: Tensor, normalize: bool) -> Tensor:
        if self.visual.proj is not None:
            pooled = pooled @ self.visual.proj
        return F.normalize(pooled, dim=-1) if normalize else pooled

    def attention_pool(self, h: Tensor, attn_hook: Optional[AttnHook] = None, final_norm: bool = True,
                       normalize: bool = True) -> Tensor:
        """The embedding ``[B, E]`` an attention-pooling head (``pool_type == "map"``) reads from a residual
        stream ``h`` ``[B, T, D]``, the head's attention computed explicitly: its probabilities
        ``[B, heads, queries, n]`` pass through ``attn_hook(n_layers, probs)``. ``n``: the rows the head reads,
        the last ``n`` rows of ``h`` (every row, or the patch rows of a timm trunk that pools without its prefix
        tokens); query 0 is the one that becomes the contrastive embedding (CoCa; timm SigLIP has one query).

        ``final_norm=False`` leaves the tower's final norm out: timm's ``norm`` before the MAP head, CoCa's
        ``ln_post`` (after its original pooler, before its 'parallel' one). With ``final_norm=True`` this is
        :meth:`head` of ``h`` up to float rounding. ``normalize=False``: before the L2 normalisation.
        Raises :class:`UnsupportedModelError` on a tower without attention pooling.
        """
        v = self.visual
        if v.attn_pool is None:
            raise UnsupportedModelError(f"attention_pool needs an attention-pooled tower, this one pools "
                                        f"'{self.pool_type}'")
        hook = attn_hook or (lambda i, a: a)
        if v.attn_pool_contrastive is None:  # the original CoCa pooler: pool, ln_post, then the class query
            out = _attentional_pooler(v.attn_pool, h, hook, self.n_layers)  # [B, queries, d]
            pooled, _ = v._global_pool(v.ln_post(out) if final_norm else out)
        else:  # 'parallel': ln_post, then the one-query contrastive pooler
            pooled = _attentional_pooler(v.attn_pool_contrastive, v.ln_post(h) if final_norm else h, hook,
                                         self.n_layers)
        return self._project(pooled, normalize)

    def mean_token_embedding(self, h: Tensor, normalize: bool = True) -> Tensor:
        """``ln_post(mean of every row of h, class token included) @ proj`` ``[B, E]``: the read-out LeGrad's
        package (``WalBouss/LeGrad``) applies to intermediate blocks of open_clip ViTs; not the tower's own head
        (which reads the class token or the patch mean). Raises :class:`UnsupportedModelError` on
        attention-pooled towers (their ``ln_post`` normalises the pooler's output)."""
        if self.visual.attn_pool is not None:
            raise UnsupportedModelError("mean_token_embedding needs a ViT without attentional pooling")
        return self._project(self.visual.ln_post(h.mean(dim=1)), normalize)


def _attentional_pooler(pool: nn.Module, h: Tensor, hook: AttnHook, index: int) -> Tensor:
    """open_clip's ``AttentionalPooler`` on ``h`` ``[B, T, D]`` with its attention explicit (the same equations as
    its ``nn.MultiheadAttention``; probabilities ``[B, heads, queries, T]`` through ``hook``): ``[B, queries, d]``."""
    mha: nn.MultiheadAttention = pool.attn
    if not mha.batch_first or mha.bias_k is not None or mha.add_zero_attn:
        raise UnsupportedModelError("attention hooks on an attentional pooler need a batch-first attention "
                                    "without bias_k / add_zero_attn")
    y = pool.ln_k(h)  # [B, T, D]
    query = pool.ln_q(pool.query)  # [Q, d]
    b, t, _ = y.shape
    d, heads = mha.embed_dim, mha.num_heads
    if mha._qkv_same_embed_dim:
        wq, wk, wv = mha.in_proj_weight.chunk(3)
    else:
        wq, wk, wv = mha.q_proj_weight, mha.k_proj_weight, mha.v_proj_weight
    bq, bk, bv = (None,) * 3 if mha.in_proj_bias is None else mha.in_proj_bias.chunk(3)
    split = lambda u: u.reshape(u.shape[0], -1, heads, d // heads).transpose(1, 2)  # noqa: E731  [B, H, ·, d/H]
    q = split(F.linear(query, wq, bq).expand(b, -1, -1))  # [B, H, Q, d/H]
    k, v = split(F.linear(y, wk, bk)), split(F.linear(y, wv, bv))  # [B, H, T, d/H]
    probs = hook(index, (q @ k.transpose(-1, -2) * (d // heads) ** -0.5).softmax(dim=-1))  # [B, H, Q, T]
    return mha.out_proj((probs @ v).transpose(1, 2).reshape(b, -1, d))  # [B, Q, d]


def _latent_pool(pool: nn.Module, y: Tensor, hook: AttnHook, index: int) -> Tensor:
    """timm's ``AttentionPoolLatent`` on ``y`` ``[B, n, D]`` with its attention explicit (timm's non-fused
    equations; probabilities ``[B, heads, latents, n]`` through ``hook``): its pooled output."""
    if pool.pos_embed is not None:
        y = y + pool.pos_embed.unsqueeze(0).to(y.dtype)
    b, n, _ = y.shape
    heads, dim = pool.num_heads, pool.head_dim
    q = pool.q(pool.latent.expand(b, -1, -1)).reshape(b, pool.latent_len, heads, dim).transpose(1, 2)
    k, v = pool.kv(y).reshape(b, n, 2, heads, dim).permute(2, 0, 3, 1, 4).unbind(0)  # [B, H, n, dim] each
    q, k = pool.q_norm(q), pool.k_norm(k)
    probs = hook(index, ((q * pool.scale) @ k.transpose(-2, -1)).softmax(dim=-1))  # [B, H, latents, n]
    out = pool.proj_drop(pool.proj((probs @ v).transpose(1, 2).reshape(b, pool.latent_len, heads * dim)))
    if getattr(pool, "mlp", None) is not None:
        out = out + pool.mlp(pool.norm(out))
    if pool.pool == "token":
        return out[:, 0]
    return out.mean(1) if pool.pool == "avg" else out


class _ProbsHook(nn.Module):
    """Stands in for a timm attention's ``attn_drop`` (identity in eval) to pass its probabilities to a hook."""

    def __init__(self, hook: AttnHook, index: int) -> None:
        super().__init__()
        self.hook, self.index = hook, index

    def forward(self, attn: Tensor) -> Tensor:
        return self.hook(self.index, attn)


class _NormTap(nn.Module):
    """Stands in for a timm attention's ``q_norm`` / ``k_norm``: runs it and hands its output to ``keep``."""

    def __init__(self, norm: nn.Module, keep: Callable[[Tensor], None]) -> None:
        super().__init__()
        self.norm, self.keep = norm, keep

    def forward(self, x: Tensor) -> Tensor:
        y = self.norm(x)
        self.keep(y)
        return y


@contextlib.contextmanager
def _timm_attn_hook(block: nn.Module, index: int, hook: Optional[AttnHook],
                    qk_hook: Optional[QKHook] = None) -> Iterator[None]:
    """While active, ``block.attn`` computes attention explicitly (timm's non-fused path, the same equations)
    and passes the probabilities ``[B, heads, T, T]`` through ``hook`` (and its normalised queries and keys
    to ``qk_hook``); restored afterwards."""
    if hook is None and qk_hook is None:
        yield
        return
    attn = block.attn
    names = ("fused_attn", "attn_drop", "q_norm", "k_norm")
    if not all(hasattr(attn, n) for n in names) or not isinstance(attn.attn_drop, nn.Dropout):
        raise UnsupportedModelError(f"attention hooks need a timm attention with attn_drop, got {type(attn).__name__}")
    saved = {n: getattr(attn, n) for n in names}
    seen: List[Tensor] = []
    attn.fused_attn, attn.attn_drop = False, _ProbsHook(hook or (lambda i, a: a), index)
    if qk_hook is not None:
        attn.q_norm, attn.k_norm = _NormTap(saved["q_norm"], seen.append), _NormTap(saved["k_norm"], seen.append)
    try:
        yield
    finally:
        for n, module in saved.items():
            setattr(attn, n, module)
    if qk_hook is not None:
        qk_hook(index, seen[0], seen[1])


class TimmImageTower(ImageTower):
    """The vision tower of an open_clip ``TimmModel`` whose trunk is a timm ``VisionTransformer`` or ``Eva``
    (SigLIP, SigLIP 2, EVA-02, PE-Core): prefix tokens (class, registers) then the patch grid; the head is
    timm's final norm, pooling (``map`` / ``avg`` / ``token``), ``fc_norm``, classifier-as-projection and
    open_clip's own ``head``."""

    def __init__(self, visual: TimmModel) -> None:
        nn.Module.__init__(self)
        trunk = getattr(visual, "trunk", None)
        kind = type(trunk).__name__
        if kind not in ("VisionTransformer", "Eva"):
            raise UnsupportedModelError(f"timm trunk {kind} is not a ViT (VisionTransformer or Eva): cannot be split")
        if getattr(visual.head, "pool", None) is not None or getattr(trunk, "dynamic_img_size", False):
            raise UnsupportedModelError(f"timm {kind} with an open_clip pooling head or dynamic image size")
        pool = "map" if getattr(trunk, "attn_pool", None) is not None else trunk.global_pool
        if pool not in ("map", "avg", "token"):
            raise UnsupportedModelError(f"timm pooling '{pool}' is not supported (map, avg or token)")
        self.visual, self.trunk = visual, trunk
        self.blocks = trunk.blocks
        self._pool_type = {"token": "tok"}.get(pool, pool)

    @property
    def grid(self) -> Tuple[int, int]:
        return tuple(self.trunk.patch_embed.grid_size)

    @property
    def image_size(self) -> Tuple[int, int]:
        return tuple(self.trunk.patch_embed.img_size)

    @property
    def n_prefix(self) -> int:
        return int(self.trunk.num_prefix_tokens)

    @property
    def pool_type(self) -> str:
        return self._pool_type

    def _rope(self) -> Optional[Tensor]:
        rope = getattr(self.trunk, "rope", None)
        if rope is None:
            return None
        return rope.get_embed() if hasattr(rope, "feat_shape") else rope.get_embed(shape=self.grid)

    def embed(self, x: Tensor) -> Tensor:
        h = self.trunk._pos_embed(self.trunk.patch_embed(x))
        h = h[0] if isinstance(h, tuple) else h  # Eva returns (tokens, rope)
        if getattr(self.trunk, "patch_drop", None) is not None:
            h = self.trunk.patch_drop(h)  # identity in eval
        return self.trunk.norm_pre(h)  # [B, n_prefix + N, D]

    def _blocks(self, h: Tensor, start: int, stop: int, hook: Optional[AttnHook] = None,
                qk_hook: Optional[QKHook] = None, x: Optional[Tensor] = None) -> Tensor:
        rope = self._rope()  # Eva's rotary embedding (a function of the grid only), None for timm ViTs
        mixed = getattr(self.trunk, "rope_mixed", False)
        for i in range(start, stop):
            block = self.blocks[i]
            with _timm_attn_hook(block, i, hook, qk_hook):
                if rope is None:
                    h = block(h)
                else:
                    h = block(h, rope=rope[i] if mixed else rope)
        return h

    def pooled_rows(self, x: Tensor) -> Optional[Tensor]:
        return torch.zeros(x.shape[0], dtype=torch.long, device=x.device) if self.pool_type == "tok" else None

    def head(self, h: Tensor, x: Tensor, normalize: bool = True) -> Tensor:
        pooled = self.trunk.fc_norm(self.trunk.pool(self.trunk.norm(h)))  # [B, D]
        out = self.visual.head(self.trunk.head(pooled))
        return F.normalize(out, dim=-1) if normalize else out

    def _map_skip(self) -> int:
        """Rows before the ones the MAP head reads: 0, or the prefix tokens when the trunk pools without them."""
        return 0 if getattr(self.trunk, "pool_include_prefix", True) in (True, None) else self.n_prefix

    def attention_pool(self, h: Tensor, attn_hook: Optional[AttnHook] = None, final_norm: bool = True,
                       normalize: bool = True) -> Tensor:
        if self.pool_type != "map":
            raise UnsupportedModelError(f"attention_pool needs a MAP head, this timm tower pools '{self.pool_type}'")
        y = (self.trunk.norm(h) if final_norm else h)[:, self._map_skip():]
        pooled = _latent_pool(self.trunk.attn_pool, y, attn_hook or (lambda i, a: a), self.n_layers)
        out = self.visual.head(self.trunk.head(self.trunk.fc_norm(pooled)))
        return F.normalize(out, dim=-1) if normalize else out

    def mean_token_embedding(self, h: Tensor, normalize: bool = True) -> Tensor:
        raise UnsupportedModelError("mean_token_embedding is defined on open_clip ViTs, not on timm trunks")

    def pool_weights(self, x: Tensor) -> Tensor:
        if self.pool_type != "map":
            return super().pool_weights(x)
        seen: List[Tensor] = []
        h = self.prefix(x, self.n_layers)  # [B, T, D]
        self.attention_pool(h, attn_hook=lambda i, a: seen.append(a) or a)
        probs = seen[0]  # [B, heads, latent, n]
        w = torch.zeros(h.shape[0], h.shape[1], device=x.device, dtype=probs.dtype)
        w[:, self._map_skip():] = probs.mean(dim=(1, 2))
        return w


def image_tower(visual: nn.Module) -> ImageTower:
    """The :class:`ImageTower` of an open_clip vision tower; :class:`UnsupportedModelError` names what cannot
    be split (ResNets, ConvNeXt / FastViT timm trunks, attention-pooled CoCa towers)."""
    if isinstance(visual, TimmModel):
        return TimmImageTower(visual)
    return ImageTower(visual)


class TextTower(Tower):
    """An open_clip ``TextTransformer``. Causal towers run on ``ids[:, :L]`` with ``L`` the batch's longest
    SOT..EOT (exact under the causal mask), so ``prefix`` returns ``[B, L, D]`` with ``L <= context_length``;
    bidirectional towers (``no_causal_mask``, SigLIP) run on the whole padded context.

    Pooling (``pool_type``): ``argmax`` (the EOT of CLIP's BPE, the largest id), ``eos`` (the first
    ``eos_id``), ``last`` (the last context position, SigLIP) or ``first`` (position 0).

    CoCa's contrastive text tower appends a class token after the whole padded context and pools it
    (``pool_type`` then only says where each caption ends); its attention masks the padding keys (ids equal to
    ``pad_id``) per sample, so it runs on the whole context, the stream has ``context_length + 1`` rows, and the
    mask needs the ids: :meth:`run` and :meth:`encode_embeddings` take them. Bidirectional towers with
    ``use_pad_mask`` mask padding the same way.

    ``tokens`` (:class:`CaptionTokens`, from :func:`caption_tokens` at load time) says where a caption starts
    and ends in the ids of a ``last`` / ``first`` tower's tokenizer; the pooled position does not depend on it."""

    def __init__(self, model: nn.Module, tokens: Optional[CaptionTokens] = None) -> None:
        super().__init__()
        self.tokens = tokens
        """The tokenizer's caption layout for ``last`` / ``first`` pooling (None: the generic rule)."""
        text = model.text if isinstance(getattr(model, "text", None), nn.Module) else model
        if text is not model and not isinstance(text, TextTransformer):
            raise UnsupportedModelError(f"text tower {type(text).__name__} is not an open_clip TextTransformer")
        self.pool_type = text.pool_type if hasattr(text, "pool_type") else model.text_pool_type
        self.eos_id = getattr(text, "eos_id", getattr(model, "text_eos_id", None))
        if self.pool_type not in ("argmax", "eos", "last", "first"):
            raise UnsupportedModelError(f"text pooling '{self.pool_type}' is not supported (argmax, eos, last, first)")
        self.token_embedding: nn.Embedding = text.token_embedding
        self.positional_embedding: nn.Parameter = text.positional_embedding
        self.cls_emb: Optional[nn.Parameter] = getattr(text, "cls_emb", None)
        """CoCa's class token (appended after the context and pooled), or None."""
        self.pad_id: int = int(getattr(text, "pad_id", 0))
        self.pad_mask = self.cls_emb is not None or bool(getattr(text, "use_pad_mask", False))
        """Whether attention masks padding keys per sample (CoCa, ``use_pad_mask``)."""
        self._cls_mask_last = bool(getattr(text, "correct_cls_mask", False))
        self.blocks = text.transformer.resblocks
        self.ln_final: nn.Module = text.ln_final
        self.text_projection = text.text_projection
        self.heads = int(getattr(text, "heads", 1))
        self.causal = text.attn_mask is not None
        """Whether the tower attends causally (CLIP) or bidirectionally (``no_causal_mask``: SigLIP)."""
        self.register_buffer("causal_mask", text.attn_mask, persistent=False)
        self.length_multiple: int = 1
        """Causal towers run on the longest SOT..EOT rounded up to a multiple of this (at most the context):
        exact under the causal mask, and it bounds the distinct text shapes a run sees (``compile=True``
        compiles once per shape; 16 gives at most 5 for CLIP's 77). 1: the longest SOT..EOT itself."""

    @property
    def context_length(self) -> int:
        """Token context of the tower (ids per caption; CoCa's class token comes on top)."""
        return self.positional_embedding.shape[0] - (self.cls_emb is not None)

    def _mask(self, length: int, x: Optional[Tensor] = None) -> Optional[Tensor]:
        causal = self.causal_mask[:length, :length] if self.causal else None
        if not self.pad_mask:
            return causal
        if x is None:
            raise ValueError("this text tower masks padding per sample (CoCa / use_pad_mask): pass the ids (x=...)")
        return self._padding_mask(x, length, causal)

    def _padding_mask(self, ids: Tensor, length: int, causal: Optional[Tensor]) -> Tensor:
        """``[B, 1, T, T]`` additive: the causal mask (if any) plus −inf on padding keys, as open_clip builds it
        (CoCa's class key at the end, or at the front for the legacy ``correct_cls_mask=False`` weights)."""
        valid = ids[:, : length - (self.cls_emb is not None)] != self.pad_id  # [B, T or T−1]
        if self.cls_emb is not None:
            ones = valid.new_ones(valid.shape[0], 1)
            valid = torch.cat([valid, ones] if self._cls_mask_last else [ones, valid], 1)  # [B, T]
        mask = torch.zeros(valid.shape, dtype=self.positional_embedding.dtype, device=ids.device)
        mask = mask.masked_fill(~valid, float("-inf"))[:, None, None, :]  # [B, 1, 1, T]
        return mask if causal is None else mask + causal.to(mask.dtype)

    @property
    def content_start(self) -> int:
        """First content token: 1 after CLIP's SOT (``argmax`` / ``eos`` towers) or a start token
        (:attr:`tokens` ``.sot``: BERT's ``[CLS]``), 0 for SigLIP's sentencepiece ids (they start with the first
        word). Without :attr:`tokens`: 0 for ``last`` towers, 1 for ``first`` towers (they pool position 0)."""
        if self.pool_type in ("argmax", "eos") or self.cls_emb is not None:
            return 1
        if self.tokens is not None:
            return int(self.tokens.sot)
        return 0 if self.pool_type == "last" else 1

    def eot_positions(self, ids: Tensor) -> Tensor:
        """Position of the pooled token of each row in the residual stream, ``[B]`` (the tower's own pooling
        rule; CoCa: its class token, after the context)."""
        if self.cls_emb is not None:
            return torch.full((ids.shape[0],), ids.shape[1], dtype=torch.long, device=ids.device)
        return self._caption_pool(ids)

    def _caption_pool(self, ids: Tensor) -> Tensor:
        """The position ``pool_type`` names in ``ids`` (CoCa: where each caption ends)."""
        if self.pool_type == "argmax":
            return ids.argmax(dim=-1)
        if self.pool_type == "eos":
            return (ids == self.eos_id).int().argmax(dim=-1)
        pos = 0 if self.pool_type == "first" else ids.shape[1] - 1
        return torch.full((ids.shape[0],), pos, dtype=torch.long, device=ids.device)

    def caption_ends(self, ids: Tensor) -> Tensor:
        """``[B]``: the position closing each caption — its EOT for ``argmax`` / ``eos`` towers; for ``last`` /
        ``first`` towers the caption's EOS: the first position of the trailing run of :attr:`tokens` ``.ends``
        (SigLIP: ``[w…, EOS=1, 1, …]``; SigLIP 2: ``[w…, EOS=1, PAD=0, …]``), or, without :attr:`tokens`, of the
        trailing run of the row's final id (a tokenizer that pads with its EOS); the last position when the
        caption fills the context with no such token."""
        if self.pool_type in ("argmax", "eos"):
            return self._caption_pool(ids)
        length = ids.shape[1]
        if self.tokens is not None and self.tokens.ends:
            ends = torch.tensor(self.tokens.ends, dtype=ids.dtype, device=ids.device)
            content = ~torch.isin(ids, ends)  # [B, L]: False on EOS / padding ids
        else:
            content = ids != ids[:, -1:]  # [B, L]: False on the trailing run of the final id
        pos = torch.arange(length, device=ids.device)
        last_word = torch.where(content, pos, torch.full_like(pos, -1)).amax(1)  # [B]
        return (last_word + 1).clamp(max=length - 1)

    def span_mask(self, ids: Tensor, special: bool = True) -> Tensor:
        """``[B, ctx]`` bool: SOT..EOT of each row (the caption with its special tokens), or
        (``special=False``) the content tokens ``content_start``..EOT (EOT excluded)."""
        return token_span(self.caption_ends(ids), ids.shape[1], special, self.content_start)

    def valid_length(self, ids: Tensor) -> int:
        """Positions the tower runs on: the longest SOT..EOT of the batch (causal; rounded up to
        :attr:`length_multiple`), or the context (bidirectional towers, and towers that pool a class token
        appended after the context)."""
        if not self.causal or self.pad_mask:
            return ids.shape[1]
        longest = int(self.eot_positions(ids).max()) + 1
        return min(ids.shape[1], -(-longest // self.length_multiple) * self.length_multiple)

    def stream_length(self, ids: Tensor) -> int:
        """Rows of the residual stream for ``ids``: :meth:`valid_length`, plus CoCa's class token."""
        return self.valid_length(ids) + (self.cls_emb is not None)

    def token_embeddings(self, ids: Tensor) -> Tensor:
        """Rows of the token-embedding table, ``[B, L, D]``."""
        return self.token_embedding(ids)

    def _with_cls(self, tok_emb: Tensor) -> Tensor:
        """Token-embedding rows with CoCa's class token appended (as they are for other towers)."""
        if self.cls_emb is None:
            return tok_emb
        return torch.cat([tok_emb, self.cls_emb.to(tok_emb.dtype).expand(tok_emb.shape[0], 1, -1)], 1)

    def stream(self, tok_emb: Tensor) -> Tensor:
        """The residual stream before the first block for token-embedding rows ``[B, L, D]``: positions added,
        CoCa's class token appended (``[B, L + 1, D]`` then)."""
        tok = self._with_cls(tok_emb)
        return tok + self.positional_embedding[: tok.shape[1]]

    def embed(self, x: Tensor) -> Tensor:
        return self.stream(self.token_embeddings(x[:, : self.valid_length(x)]))  # [B, L, D] (CoCa: L = ctx + 1)

    def projection_parameters(self) -> List[nn.Parameter]:
        proj = self.text_projection
        if proj is None:
            return []
        return list(proj.parameters()) if isinstance(proj, nn.Module) else [proj]

    def _project(self, pooled: Tensor, normalize: bool = True) -> Tensor:
        if self.text_projection is not None:
            if isinstance(self.text_projection, nn.Linear):
                pooled = self.text_projection(pooled)
            else:
                pooled = pooled @ self.text_projection
        return F.normalize(pooled, dim=-1) if normalize else pooled

    def head(self, h: Tensor, x: Tensor, normalize: bool = True) -> Tensor:
        return self._pool_at(h, self.eot_positions(x), normalize)

    def pooled_rows(self, x: Tensor) -> Optional[Tensor]:
        return None if self.pad_mask else self.eot_positions(x)

    def head_pooled(self, h: Tensor, x: Tensor, normalize: bool = True) -> Tensor:
        return self._pool_at(h, torch.zeros(h.shape[0], dtype=torch.long, device=h.device), normalize)

    def _pool_at(self, h: Tensor, pool_at: Tensor, normalize: bool = True) -> Tensor:
        h = self.ln_final(h)  # [B, L, D]
        return self._project(h[torch.arange(h.shape[0], device=h.device), pool_at], normalize)

    def encode_embeddings(self, tok_emb: Tensor, pool_at: Tensor, ids: Optional[Tensor] = None) -> Tensor:
        """Embed given token-embedding rows ``[B, L, D]`` (positions added here), pooled at ``pool_at`` ``[B]``.

        A bidirectional tower reads every given row (pass the whole context); a causal one rows 0..max(pool_at).
        ``ids`` ``[B, L]``: the ids the rows stand for, needed only by towers that mask padding (CoCa: pass the
        whole context; its class token is appended here and ``pool_at`` is :meth:`eot_positions`).
        """
        if self.causal and not self.pad_mask:
            tok_emb = tok_emb[:, : int(pool_at.max()) + 1]
        return self._pool_at(self._blocks(self.stream(tok_emb), 0, self.n_layers, x=ids), pool_at)


class SplitCLIP(nn.Module):
    """A frozen open_clip CLIP with :class:`ImageTower` ``image`` and :class:`TextTower` ``text``."""

    def __init__(self, model: nn.Module, preprocess: Callable, tokenizer: Callable, name: str = "",
                 text_tokens: Optional[CaptionTokens] = None) -> None:
        """``text_tokens``: the tokenizer's caption layout for ``last`` / ``first``-pooled text towers
        (:func:`caption_tokens`; :func:`clipib.load_clip` passes it from the model config)."""
        super().__init__()
        if not isinstance(model, (CLIP, CustomTextCLIP, CoCa)):
            raise UnsupportedModelError(f"{type(model).__name__} is not an open_clip CLIP/CustomTextCLIP/CoCa model")
        model.eval().requires_grad_(False)
        self.model = model
        self.image = image_tower(model.visual)
        self.text = TextTower(model, text_tokens)
        self.preprocess = preprocess
        self.tokenizer = tokenizer
        """open_clip's tokenizer (CPU ids, for data pipelines); :meth:`tokenize` puts ids on the model's device."""
        self.name = name

    def copy(self) -> "SplitCLIP":
        """An independent copy: the weights deep-copied (same device and dtype), preprocess and tokenizer shared.

        Changing the copy's weights (e.g. the model-randomisation check) leaves this model untouched.
        """
        twin = SplitCLIP(copy.deepcopy(self.model), self.preprocess, self.tokenizer, name=self.name,
                         text_tokens=self.text.tokens)
        twin.text.length_multiple = self.text.length_multiple
        return twin

    def train(self, mode: bool = True) -> "SplitCLIP":
        """The model stays in eval mode (dropout and patch dropout off)."""
        return super().train(False)

    @property
    def grid(self) -> Tuple[int, int]:
        """Patch grid ``(gh, gw)`` of the image tower."""
        return self.image.grid

    @property
    def image_size(self) -> Tuple[int, int]:
        """Input resolution ``(H, W)``."""
        return self.image.image_size

    @property
    def context_length(self) -> int:
        """Text context length."""
        return self.text.context_length

    @property
    def normalization(self) -> Tuple[Tuple[float, ...], Tuple[float, ...]]:
        """Per-channel ``(mean, std)`` of the preprocess's Normalize step (OpenAI's if it has none)."""
        for t in getattr(self.preprocess, "transforms", []):
            if hasattr(t, "mean") and hasattr(t, "std"):
                return tuple(t.mean), tuple(t.std)
        return OPENAI_DATASET_MEAN, OPENAI_DATASET_STD

    @property
    def device(self) -> torch.device:
        """Device of the weights."""
        return self.text.positional_embedding.device

    @property
    def dtype(self) -> torch.dtype:
        """Floating dtype of the weights."""
        return self.text.positional_embedding.dtype

    def tokenize(self, texts: Sequence[str]) -> Tensor:
        """Token ids ``[B, context_length]`` on the model's device; over-long texts are truncated (EOT kept)
        with a warning."""
        texts = [texts] if isinstance(texts, str) else list(texts)
        encode = getattr(self.tokenizer, "encode", None)
        if encode is not None:
            for text in texts:
                n = len(encode(text)) + 2
                if n > self.context_length:
                    warnings.warn(
                        f"caption of {n} tokens truncated to the context of {self.context_length}: {text[:60]!r}",
                        stacklevel=2,
                    )
        return self.tokenizer(texts).to(self.device)

    def token_strings(self, ids: Tensor) -> list:
        """The tokens of one row of ids from SOT to EOT, as strings."""
        end = int(self.text.caption_ends(ids[None])[0]) + 1
        decode = getattr(self.tokenizer, "decode", None)
        if decode is None:
            return [str(i) for i in ids[:end].tolist()]
        return [decode([i]).strip() for i in ids[:end].tolist()]

    def similarity(self, images: Tensor, ids: Tensor) -> Tensor:
        """Cosine similarity of each pair, ``[B]``."""
        return (self.image.encode(images) * self.text.encode(ids)).sum(-1)
