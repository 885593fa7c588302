"""Confidence Drop and Confidence Increase (M2IB eqs. 17-18), with three perturbation protocols.

Per sample, with ``o`` the cosine of the clean pair and ``s`` the cosine after keeping only what the
attribution marks important in one modality:

* ``drop = max(0, o - s) * 100`` (eq. 17; lower is better);
* ``incr = 100 if s > o else 0`` (eq. 18; higher is better: the share of samples whose score rose).

The reported number is the mean over samples, in percent, as both reference repositories compute it
(REFERENCE_NOTES §6). How the perturbed input is built is the **protocol**:

``"corrected"`` (default, clipib)
    image: normalised pixels ``x`` times the [0, 1] map, broadcast over channels (``x * map[:, None]``).
    text: SOT and EOT kept; content tokens whose score is at or below the median of the content
    tokens' scores become ``replacement_id`` (default 0 - open_clip's padding id, the "padding token"
    blank M2IB's Table 1 uses); pooled at the original EOT position.
``"m2ib"`` (reproduces M2IB's published numbers)
    image: **reproduces a bug** of M2IB's evaluation script - the map is indexed with the wrong shape,
    so every image row is multiplied by the map's *top row* (``x * map[:, None, :1, :]``). Use it only
    to reproduce M2IB's tables.
    text: SOT and EOT stripped (content moved to positions 0..n-1, both for the clean and the perturbed
    caption), tokens at or below the median become id 0, and the text is pooled by Hugging Face's
    legacy rule for the OpenAI checkpoints: at the position of the **largest token id** of the stripped
    sequence - which masking can move.
``"nib"`` (reproduces NIB's published numbers)
    image: as ``"corrected"`` (NIB's copy fixes the broadcasting).
    text: SOT and EOT stripped, legacy pooling (as ``"m2ib"``; the ids do not change, so neither does
    the position), and each token-embedding **row** scaled by the continuous [0, 1] score - NIB scales
    the embedding table in place, so a token id occurring several times has its row scaled by the
    product of all its occurrences' scores, at every occurrence.

The kernels (:func:`confidence_drop`, :func:`confidence_increase`, :func:`perturb_image`,
:func:`median_mask`, :func:`strip_special`, :func:`legacy_pool_positions`,
:func:`duplicate_product_factors`) are pure; :func:`image_confidence_scores` and
:func:`text_confidence_scores` build and score the perturbed inputs with a SplitCLIP;
:class:`Confidence` is the eval metric (registry name ``confidence``).
"""
from __future__ import annotations

from typing import Any, Dict

import torch
from torch import Tensor

from clipib.attribution.base import Attribution
from clipib.attribution.common import cosine
from clipib.metrics.base import AttributionMetric, Batch, caption_rule, default_eot, nanquantile_linear
from clipib.models.split import SplitCLIP, token_span

__all__ = [
    "PROTOCOLS",
    "confidence_drop",
    "confidence_increase",
    "perturb_image",
    "median_mask",
    "strip_special",
    "legacy_pool_positions",
    "duplicate_product_factors",
    "image_confidence_scores",
    "text_confidence_scores",
    "Confidence",
]

PROTOCOLS = ("corrected", "m2ib", "nib")


def _check_protocol(protocol: str) -> None:
    if protocol not in PROTOCOLS:
        raise ValueError(f"protocol must be one of {PROTOCOLS}, got {protocol!r}")


def confidence_drop(orig: Tensor, pert: Tensor) -> Tensor:
    """M2IB eq. 17 per sample, in percent: ``max(0, orig - pert) * 100``.

    Example:
        >>> confidence_drop(torch.tensor([0.50, 0.25]), torch.tensor([0.25, 0.50]))
        tensor([25.,  0.])
    """
    return (orig - pert).clamp(min=0) * 100


def confidence_increase(orig: Tensor, pert: Tensor) -> Tensor:
    """M2IB eq. 18 per sample, in percent: ``100`` if ``pert > orig`` else ``0``.

    Example:
        >>> confidence_increase(torch.tensor([0.50, 0.25]), torch.tensor([0.25, 0.50]))
        tensor([  0., 100.])
    """
    return (pert > orig).to(orig.dtype) * 100


def perturb_image(images: Tensor, maps: Tensor, protocol: str = "corrected") -> Tensor:
    """Normalised ``images [B, C, H, W]`` times the [0, 1] ``maps [B, H, W]`` under ``protocol``.

    Example (``"m2ib"`` multiplies every row by the map's top row):
        >>> x = torch.ones(1, 1, 2, 2); m = torch.tensor([[[0.0, 1.0], [0.5, 0.5]]])
        >>> perturb_image(x, m)[0, 0], perturb_image(x, m, "m2ib")[0, 0]
        (tensor([[0.0000, 1.0000],
                [0.5000, 0.5000]]), tensor([[0., 1.],
                [0., 1.]]))
    """
    _check_protocol(protocol)
    b, _, h, w = images.shape
    if maps.shape != (b, h, w):
        raise ValueError(f"maps must be [B, H, W] = {(b, h, w)}, got {tuple(maps.shape)}")
    m = maps.to(images.dtype)
    if protocol == "m2ib":
        return images * m[:, None, :1, :]  # M2IB's bug: the top row, broadcast down every row
    return images * m[:, None]  # [B, C, H, W]


def median_mask(ids: Tensor, scores: Tensor, valid: Tensor, replacement_id: int = 0) -> Tensor:
    """Replace valid tokens whose score is ``<=`` the median of the valid scores by ``replacement_id``.

    The median is NumPy's (mean of the two middle values for an even count), as M2IB's
    ``np.percentile(scores, 50)``.

    Example:
        >>> median_mask(torch.tensor([[5, 6, 7, 8]]), torch.tensor([[0.9, 0.1, 0.5, 0.7]]),
        ...             torch.tensor([[True, True, True, True]]))
        tensor([[5, 0, 0, 8]])
    """
    s = torch.where(valid, scores.double(), torch.full_like(scores, torch.nan, dtype=torch.float64))
    med = nanquantile_linear(s, 0.5)[:, None]  # [B, 1]
    drop = valid & (s <= med)
    return torch.where(drop, torch.full_like(ids, replacement_id), ids)


def strip_special(ids: Tensor, scores: Tensor, eot: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """Drop SOT and EOT: content tokens moved to positions ``0..n-1``, zero-padded to the same length.

    Returns ``(ids [B, L], scores [B, L], valid BoolTensor[B, L])``.

    Example:
        >>> ids, sc, valid = strip_special(torch.tensor([[49406, 320, 1125, 49407, 0]]),
        ...                                torch.tensor([[0.1, 0.2, 0.3, 0.4, 0.0]]))
        >>> ids, valid.int()
        (tensor([[ 320, 1125,    0,    0,    0]]), tensor([[1, 1, 0, 0, 0]], dtype=torch.int32))
    """
    content = token_span(default_eot(ids, eot), ids.shape[1], special=False)  # [B, L]
    n = content.sum(1, keepdim=True)  # [B, 1]
    pos = torch.arange(ids.shape[1], device=ids.device)[None, :]  # [1, L]
    src = (pos + 1).clamp(max=ids.shape[1] - 1).expand_as(ids)  # content starts at position 1
    valid = pos < n
    new_ids = torch.where(valid, ids.gather(1, src), torch.zeros_like(ids))
    new_scores = torch.where(valid, scores.gather(1, src), torch.zeros_like(scores))
    return new_ids, new_scores, valid


def legacy_pool_positions(ids: Tensor) -> Tensor:
    """Hugging Face's legacy pooling for the OpenAI CLIP configs: first position of the largest id.

    Example:
        >>> legacy_pool_positions(torch.tensor([[320, 40000, 1125, 0], [0, 0, 0, 0]]))
        tensor([1, 0])
    """
    return ids.argmax(dim=-1)


def duplicate_product_factors(ids: Tensor, scores: Tensor, valid: Tensor) -> Tensor:
    """Per-position embedding scale of NIB's text protocol: the product of the scores of all valid
    occurrences of the same token id (1 outside ``valid``).

    Example (id 7 occurs twice: both rows scaled by 0.5 * 0.4):
        >>> duplicate_product_factors(torch.tensor([[7, 8, 7]]), torch.tensor([[0.5, 0.9, 0.4]]),
        ...                           torch.tensor([[True, True, True]]))
        tensor([[0.2000, 0.9000, 0.2000]])
    """
    same = (ids[:, :, None] == ids[:, None, :]) & valid[:, None, :] & valid[:, :, None]  # [B, L, L]
    f = torch.where(same, scores[:, None, :], torch.ones_like(same, dtype=scores.dtype)).prod(-1)
    return torch.where(valid, f, torch.ones_like(f))


@torch.no_grad()
def image_confidence_scores(
    clip: Any, images: Tensor, maps: Tensor, ids: Tensor, protocol: str = "corrected"
) -> tuple[Tensor, Tensor]:
    """``(orig [B], pert [B])``: cosines of the clean and the map-multiplied images with the captions."""
    text_emb = clip.text.encode(ids)  # [B, E]
    orig = cosine(clip.image.encode(images), text_emb)
    pert = cosine(clip.image.encode(perturb_image(images, maps, protocol)), text_emb)
    return orig, pert


@torch.no_grad()
def text_confidence_scores(
    clip: Any,
    images: Tensor,
    ids: Tensor,
    scores: Tensor,
    protocol: str = "corrected",
    replacement_id: int = 0,
) -> tuple[Tensor, Tensor]:
    """``(orig [B], pert [B])``: cosines of the clean and the perturbed captions with the images.

    ``scores [B, L]`` are the [0, 1] token scores (``Attribution.text``). ``replacement_id`` applies to
    ``"corrected"`` only (``"m2ib"`` always uses 0, ``"nib"`` replaces nothing).
    """
    _check_protocol(protocol)
    image_emb = clip.image.encode(images)  # [B, E]
    tower = clip.text
    eot = tower.eot_positions(ids)  # [B]: the pooled positions
    if protocol == "corrected":
        ends, start = caption_rule(tower, ids)
        content = token_span(ends, ids.shape[1], special=False, start=start)
        new_ids = median_mask(ids, scores, content, replacement_id)
        orig = cosine(tower.encode(ids), image_emb)
        pert = cosine(tower.encode_embeddings(tower.token_embeddings(new_ids), eot, new_ids), image_emb)
        return orig, pert
    if getattr(tower, "pool_type", "argmax") != "argmax" or getattr(tower, "cls_emb", None) is not None:
        raise ValueError(f"text confidence protocol '{protocol}' re-packs CLIP BPE ids (SOT..EOT, argmax pooling); "
                         f"this text tower pools '{tower.pool_type}': use protocol 'corrected'")
    s_ids, s_scores, valid = strip_special(ids, scores, eot)
    clean = tower.encode_embeddings(tower.token_embeddings(s_ids), legacy_pool_positions(s_ids))
    orig = cosine(clean, image_emb)
    if protocol == "m2ib":
        p_ids = median_mask(s_ids, s_scores, valid, 0)
        emb = tower.encode_embeddings(tower.token_embeddings(p_ids), legacy_pool_positions(p_ids))
    else:  # nib
        factors = duplicate_product_factors(s_ids, s_scores.to(torch.float32), valid)  # [B, L]
        tok = tower.token_embeddings(s_ids)  # [B, L, D]
        emb = tower.encode_embeddings(tok * factors[..., None].to(tok.dtype), legacy_pool_positions(s_ids))
    return orig, cosine(emb, image_emb)


class Confidence(AttributionMetric):
    """Confidence Drop / Increase (M2IB eqs. 17-18) under ``protocol``: values ``{m}_drop``, ``{m}_incr``.

    Args:
        protocol: ``"corrected"`` (default), ``"m2ib"`` or ``"nib"`` (see the module docstring).
        replacement_id: the token masked text tokens become (``"corrected"`` only).
        n_seeds: number of seeds aggregated (:class:`~clipib.metrics.base.SeedMeanStd`).

    Example (a constant map ranks nothing: its values are undefined, NaN, counted in the summary's ``skipped``):
        >>> from clipib import load_clip
        >>> clip = load_clip("clipib-shapes")  # the shipped 64 px model
        >>> batch = {"image": torch.randn(2, 3, 64, 64), "ids": clip.tokenize(["a dog", "a cat"])}
        >>> metric = Confidence(protocol="corrected")
        >>> metric.update(clip, batch, Attribution(image=torch.ones(2, 64, 64)), "image")
        {'image_drop': tensor([nan, nan]), 'image_incr': tensor([nan, nan])}
        >>> metric.compute()["image_drop"]["mean"]
        tensor(nan, dtype=torch.float64)
    """

    VALUES = {"image": ("image_drop", "image_incr"), "text": ("text_drop", "text_incr")}
    higher_is_better = None

    def __init__(self, protocol: str = "corrected", replacement_id: int = 0, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        if protocol not in PROTOCOLS:
            raise ValueError(f"confidence protocol must be one of {PROTOCOLS}, got {protocol!r}")
        self.protocol, self.replacement_id = protocol, replacement_id

    def score(self, clip: SplitCLIP, batch: Batch, attr: Attribution, modality: str) -> Dict[str, Tensor]:
        """``{m}_drop`` and ``{m}_incr`` per sample, in percent."""
        images, ids = batch["image"], batch["ids"]
        if modality == "image":
            orig, pert = image_confidence_scores(clip, images, attr.image, ids, self.protocol)
        else:
            orig, pert = text_confidence_scores(clip, images, ids, attr.text, self.protocol, self.replacement_id)
        return {f"{modality}_drop": confidence_drop(orig, pert), f"{modality}_incr": confidence_increase(orig, pert)}
