"""How alike two attribution maps are, and re-running a method: the shared kernels of the randomisation and
robustness metrics (:mod:`~clipib.metrics.randomisation`, :mod:`~clipib.metrics.robustness`).

Kernels (torch, batched, on the input's device): :func:`spearman` (rank correlation with average ranks for
ties, over a per-row valid mask), :func:`ssim` (scikit-image's default structural similarity: a 7 × 7 uniform
window, sample covariance, ``data_range`` = the pair's joint max − min, the mean over valid windows — what
Quantus' ``ssim`` computes), :func:`topk_overlap` (the share of the top-k cells two maps have in common; the map-vs-mask top-k intersection
is :func:`clipib.metrics.relevance_localization.topk_intersection`).
:func:`rerun` re-runs an :class:`~clipib.attribution.base.Attributor` in chunks; :func:`map_rows` reads the
maps a comparison uses; :func:`compare` returns every statistic of a modality.
"""
from __future__ import annotations

from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from clipib.attribution.base import Attribution, Attributor
from clipib.metrics.base import average_ranks
from clipib.models.split import SplitCLIP

__all__ = ["spearman", "ssim", "topk_overlap", "pair_seeds", "rerun", "map_rows", "compare", "STATS"]

STATS = {"image": ("rho_abs", "rho", "ssim", "topk"), "text": ("rho_abs", "rho")}
"""Statistics :func:`compare` returns per modality (SSIM and top-k need a 2-D map: image only)."""


def spearman(a: Tensor, b: Tensor, valid: Optional[Tensor] = None) -> Tensor:
    """Spearman rank correlation of each row pair of ``a, b [B, N]`` over ``valid [B, N]``: ``[B]``.

    The Pearson correlation of average ranks (scipy's ``spearmanr``); NaN when either row is constant.

    >>> spearman(torch.tensor([[1.0, 2.0, 3.0, 4.0]]), torch.tensor([[10.0, 20.0, 40.0, 30.0]]))
    tensor([0.8000], dtype=torch.float64)
    """
    ok = torch.ones_like(a, dtype=torch.bool) if valid is None else valid
    n = ok.sum(1, keepdim=True).clamp_min(1)  # [B, 1]
    ra, rb = average_ranks(a, ok), average_ranks(b, ok)
    ra = (ra - ra.sum(1, keepdim=True) / n) * ok
    rb = (rb - rb.sum(1, keepdim=True) / n) * ok
    den = (ra.pow(2).sum(1) * rb.pow(2).sum(1)).sqrt()
    return torch.where(den > 0, (ra * rb).sum(1) / den.clamp_min(1e-300), torch.full_like(den, float("nan")))


def ssim(a: Tensor, b: Tensor, window: int = 7) -> Tensor:
    """Structural similarity of each map pair ``a, b [B, H, W]``: ``[B]`` (scikit-image's defaults).

    ``data_range`` is the pair's joint max − min (as Quantus passes it); constants ``K1 = 0.01``,
    ``K2 = 0.03``; NaN when both maps are one constant.

    >>> x = torch.rand(2, 9, 9, generator=torch.Generator().manual_seed(0))
    >>> ssim(x, x)
    tensor([1., 1.], dtype=torch.float64)
    """
    if min(a.shape[-2:]) < window:
        raise ValueError(f"SSIM needs maps of at least {window}x{window}, got {tuple(a.shape[-2:])}")
    a, b = a.to(torch.float64)[:, None], b.to(torch.float64)[:, None]  # [B, 1, H, W]
    both = torch.cat([a.flatten(1), b.flatten(1)], 1)  # [B, 2HW]
    span = (both.amax(1) - both.amin(1))[:, None, None, None]  # [B, 1, 1, 1]
    c1, c2 = (0.01 * span) ** 2, (0.03 * span) ** 2

    def pool(t: Tensor) -> Tensor:
        return F.avg_pool2d(t, window, stride=1)  # [B, 1, H-w+1, W-w+1]: the windows inside the map

    cov = window * window / (window * window - 1)  # sample covariance
    ua, ub = pool(a), pool(b)
    va, vb = cov * (pool(a * a) - ua * ua), cov * (pool(b * b) - ub * ub)
    vab = cov * (pool(a * b) - ua * ub)
    s = (2 * ua * ub + c1) * (2 * vab + c2) / ((ua * ua + ub * ub + c1) * (va + vb + c2))
    return s.flatten(1).mean(1)


def topk_overlap(a: Tensor, b: Tensor, k: int) -> Tensor:
    """Share of the ``k`` largest entries of each row of ``a [B, N]`` that are among ``b``'s ``k`` largest: ``[B]``.

    >>> topk_overlap(torch.tensor([[4.0, 3.0, 2.0, 1.0]]), torch.tensor([[4.0, 1.0, 3.0, 2.0]]), k=2)
    tensor([0.5000])
    """
    if not 1 <= k <= a.shape[1]:
        raise ValueError(f"k={k} outside 1..{a.shape[1]}")
    top_a = torch.zeros_like(a, dtype=torch.bool).scatter_(1, a.topk(k, dim=1).indices, True)
    top_b = torch.zeros_like(b, dtype=torch.bool).scatter_(1, b.topk(k, dim=1).indices, True)
    return (top_a & top_b).sum(1).to(a.dtype) / k


def map_rows(clip: SplitCLIP, attr: Attribution, ids: Tensor, modality: str) -> Tuple[Tensor, Tensor]:
    """``(raw scores [B, N], valid [B, N])`` of a modality: the patch grid (all valid) or SOT..EOT tokens."""
    if modality == "image":
        raw = attr.image_grid.flatten(1)  # [B, gh*gw]
        return raw, torch.ones_like(raw, dtype=torch.bool)
    return attr.text_raw, clip.text.span_mask(ids)  # [B, ctx]


def compare(clip: SplitCLIP, ref: Attribution, other: Attribution, ids: Tensor, modality: str,
            topk: float = 0.1) -> Dict[str, Tensor]:
    """:data:`STATS` of ``modality`` between two attributions of the same pairs, each ``[B]``.

    ``rho_abs`` / ``rho``: :func:`spearman` of the absolute / signed raw scores (patch grid, SOT..EOT tokens);
    ``ssim``: :func:`ssim` of the public ``[0, 1]`` image maps at input resolution; ``topk``:
    :func:`topk_overlap` of the absolute grid scores, ``k = max(1, round(topk · cells))``.
    """
    a, valid = map_rows(clip, ref, ids, modality)
    b, _ = map_rows(clip, other, ids, modality)
    out = {"rho_abs": spearman(a.abs(), b.abs(), valid), "rho": spearman(a, b, valid)}
    if modality == "image":
        out["ssim"] = ssim(ref.image, other.image)
        out["topk"] = topk_overlap(a.abs(), b.abs(), max(1, round(topk * a.shape[1])))
    return out


def pair_seeds(method: Attributor, seeds: Optional[Sequence[int]], n: int) -> List[int]:
    """The per-pair seeds of a batch of ``n``: ``seeds``, or the method's own seed for every pair when None."""
    return [method.seed] * n if seeds is None else [int(s) for s in seeds]


def rerun(method: Attributor, images: Tensor, ids: Tensor, modality: str, seeds: Optional[Sequence[int]],
          chunk: Optional[int] = None) -> Attribution:
    """``method.attribute(images, ids, modality, seeds)`` in chunks of at most ``chunk`` pairs, concatenated.

    Only the maps of ``modality`` (and their raw scores) are kept; batch in, batch out (DESIGN.md §3), so
    chunking does not change them.
    """
    n = images.shape[0]
    step = n if chunk is None else max(1, chunk)
    seeds = pair_seeds(method, seeds, n)
    parts = [method.attribute(images[i:i + step], ids[i:i + step], modality, seeds=seeds[i:i + step])
             for i in range(0, n, step)]
    if modality == "image":
        return Attribution(image=torch.cat([p.image for p in parts]), image_grid=torch.cat([p.image_grid for p in parts]))
    return Attribution(text=torch.cat([p.text for p in parts]), text_raw=torch.cat([p.text_raw for p in parts]))
