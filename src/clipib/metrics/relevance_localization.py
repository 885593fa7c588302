"""Localisation finer than IoU: how much of the map, and how much of its top, lies on the object.

With ``a`` the image map (``attr.image``, [0, 1], pixel resolution) and ``G`` the object region (the batch's
mask / box, :func:`clipib.regions.ground_truth`):

* :func:`energy_pointing_game` - Score-CAM (Wang et al. 2020, Sec. 5.2): the share of the map's energy inside
  the object, ``sum_G a+ / sum a+`` (positive part; a [0, 1] map is its own positive part). Quantus:
  ``AttributionLocalisation``. Higher is better.
* :func:`relevance_mass_accuracy` - Arras et al. 2022 (CLEVR-XAI): ``R_within / R_total`` = ``sum_G a / sum a``
  (signed sums; Quantus ``RelevanceMassAccuracy``). On a non-negative map it equals the energy pointing game;
  the two differ only on signed maps. Higher is better.
* :func:`relevance_rank_accuracy` - Arras et al. 2022: with ``K = |G|``, the share of the ``K`` highest-scored
  pixels that lie in ``G`` (Quantus ``RelevanceRankAccuracy``). Higher is better.
* :func:`topk_intersection` - Theiner et al. 2021 (Quantus ``TopKIntersection``): the share of the top ``k``
  pixels inside ``G``; ``k`` a fraction of the pixels (default 0.02, about Quantus' 1000 px at 224 px). Higher.
* :func:`mask_auroc` - the AUROC of the map as a per-pixel classifier of ``G`` (Quantus ``AUC``, which is
  scikit-learn's ``roc_curve`` + trapezoid): the Mann-Whitney statistic with ties counted one half. Higher.

**Ties** in the top-k metrics: the pixels tied across the k-th place are taken fractionally (the expected
value under uniform random tie-breaking), so a ranking cannot gain from ties; Quantus breaks them by
``argsort`` position. **Constant maps** (incl. all-zero) carry no ranking and no mass distribution: every value
is NaN, counted as skipped - never a silent 0 or a chance-level hit. An empty ``G`` (a box cropped away) gives
NaN; so does a ``G`` covering the whole image for :func:`mask_auroc` (no negatives).

:class:`RelevanceLocalization` is the eval metric (registry name ``relevance_localization``; values
``energy_pg``, ``rel_mass``, ``rel_rank``, ``topk_inter``, ``mask_auroc``; image modality). Cost: no model pass.
"""
from __future__ import annotations

import math
from typing import Any, Dict

import torch
from torch import Tensor

from clipib.attribution.base import Attribution
from clipib.metrics.base import AttributionMetric, Batch, average_ranks
from clipib.metrics.localization import _target_mask
from clipib.regions import ground_truth
from clipib.models.split import SplitCLIP

__all__ = [
    "topk_weights",
    "energy_pointing_game",
    "relevance_mass_accuracy",
    "relevance_rank_accuracy",
    "topk_intersection",
    "mask_auroc",
    "RelevanceLocalization",
]


def _rows(maps: Tensor, target: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """``(a [B, N] float64, G [B, N] bool, ok [B])``: ok = non-empty G and a non-constant map."""
    gt = _target_mask(maps, target).flatten(1)  # [B, N]
    a = maps.flatten(1).double()  # [B, N]
    ok = gt.any(1) & (a.amax(1) > a.amin(1))
    return a, gt, ok


def _nan_unless(ok: Tensor, x: Tensor) -> Tensor:
    return torch.where(ok, x, torch.full_like(x, math.nan))


def _bounds(scores: Tensor) -> tuple[Tensor, Tensor]:
    """Per entry of ``scores [B, N]``: ``(#entries < it, #entries <= it)`` in its row, both ``[B, N]``."""
    srt = scores.sort(dim=1).values.contiguous()
    x = scores.contiguous()
    return torch.searchsorted(srt, x, right=False), torch.searchsorted(srt, x, right=True)


def topk_weights(scores: Tensor, k: Tensor) -> Tensor:
    """Expected membership ``[B, N]`` in each row's top ``k [B]`` under uniform random tie-breaking.

    An entry with ``g`` entries strictly above it and ``t`` tied with it (itself included) is in with weight
    ``clamp((k - g) / t, 0, 1)``; each row's weights sum to ``k``.

    Example:
        >>> topk_weights(torch.tensor([[3.0, 1.0, 1.0, 0.0]]), torch.tensor([2]))
        tensor([[1.0000, 0.5000, 0.5000, 0.0000]], dtype=torch.float64)
    """
    lo, hi = _bounds(scores)
    n = scores.shape[1]
    above, tied = (n - hi).double(), (hi - lo).double()
    return ((k.double()[:, None] - above) / tied).clamp(0.0, 1.0)


def energy_pointing_game(maps: Tensor, target: Tensor) -> Tensor:
    """Score-CAM's energy pointing game: ``sum_G a+ / sum a+`` ``[B]`` float64 (NaN: constant map / empty G).

    Example:
        >>> m = torch.tensor([[[0.0, 1.0], [1.0, 2.0]]])
        >>> energy_pointing_game(m, torch.tensor([[[False, False], [True, True]]]))
        tensor([0.7500], dtype=torch.float64)
    """
    a, gt, ok = _rows(maps, target)
    pos = a.clamp_min(0)
    total = pos.sum(1)
    return _nan_unless(ok & (total > 0), (pos * gt).sum(1) / total.clamp_min(1e-300))


def relevance_mass_accuracy(maps: Tensor, target: Tensor) -> Tensor:
    """Arras et al.'s relevance mass accuracy ``sum_G a / sum a`` ``[B]`` (NaN: constant map / empty G / zero sum).

    Example:
        >>> m = torch.tensor([[[0.0, 1.0], [1.0, 2.0]]])
        >>> relevance_mass_accuracy(m, torch.tensor([[[False, True], [False, False]]]))
        tensor([0.2500], dtype=torch.float64)
    """
    a, gt, ok = _rows(maps, target)
    total = a.sum(1)
    return _nan_unless(ok & (total != 0), (a * gt).sum(1) / torch.where(total != 0, total, torch.ones_like(total)))


def relevance_rank_accuracy(maps: Tensor, target: Tensor) -> Tensor:
    """Arras et al.'s relevance rank accuracy: share of the top ``|G|`` pixels inside ``G`` ``[B]`` float64.

    Example:
        >>> m = torch.tensor([[[0.0, 3.0], [1.0, 2.0]]])
        >>> relevance_rank_accuracy(m, torch.tensor([[[False, True], [True, False]]]))
        tensor([0.5000], dtype=torch.float64)
    """
    a, gt, ok = _rows(maps, target)
    k = gt.sum(1)  # [B]
    hits = (topk_weights(a, k) * gt).sum(1)
    return _nan_unless(ok, hits / k.clamp_min(1).double())


def topk_intersection(maps: Tensor, target: Tensor, k: float = 0.02) -> Tensor:
    """Share of the top ``round(k * N)`` pixels (at least 1) inside ``G`` ``[B]`` float64.

    Example:
        >>> m = torch.tensor([[[0.0, 3.0], [1.0, 2.0]]])
        >>> topk_intersection(m, torch.tensor([[[False, True], [True, False]]]), k=0.25)
        tensor([1.], dtype=torch.float64)
    """
    if not 0.0 < k <= 1.0:
        raise ValueError(f"k must be a fraction of the pixels in (0, 1], got {k}")
    a, gt, ok = _rows(maps, target)
    top = max(1, round(k * a.shape[1]))
    hits = (topk_weights(a, torch.full_like(a[:, 0], top)) * gt).sum(1)
    return _nan_unless(ok, hits / top)


def mask_auroc(maps: Tensor, target: Tensor) -> Tensor:
    """AUROC of the map's values as a classifier of ``G`` pixels (ties = 1/2) ``[B]`` float64.

    NaN also where ``G`` is the whole image (no negatives).

    Example:
        >>> m = torch.tensor([[[0.0, 3.0], [1.0, 1.0]]])
        >>> mask_auroc(m, torch.tensor([[[False, True], [True, False]]]))
        tensor([0.8750], dtype=torch.float64)
    """
    a, gt, ok = _rows(maps, target)
    pos = gt.sum(1).double()
    neg = gt.shape[1] - pos
    rank_sum = (average_ranks(a) * gt).sum(1)
    auc = (rank_sum - pos * (pos + 1) / 2) / (pos * neg).clamp_min(1)
    return _nan_unless(ok & (neg > 0), auc)


class RelevanceLocalization(AttributionMetric):
    """Energy pointing game, relevance mass / rank accuracy, top-k intersection and mask AUROC of the image map.

    Values ``energy_pg``, ``rel_mass``, ``rel_rank``, ``topk_inter``, ``mask_auroc`` (all higher is better;
    image modality); ground truth from the batch as for ``localization`` (:func:`ground_truth`).

    Args:
        topk: ``k`` of :func:`topk_intersection` as a fraction of the pixels.
        n_seeds: number of seeds aggregated.

    Example:
        >>> metric = RelevanceLocalization(topk=0.25)
        >>> m = torch.zeros(2, 4, 4); m[0, :2, :2] = 1.0  # sample 1: a constant map
        >>> batch = {"box": torch.tensor([[0.0, 0.0, 2.0, 2.0], [0.0, 0.0, 2.0, 2.0]])}
        >>> {k: v.tolist() for k, v in metric.update(None, batch, Attribution(image=m), "image").items()}
        {'energy_pg': [1.0, nan], 'rel_mass': [1.0, nan], 'rel_rank': [1.0, nan], 'topk_inter': [1.0, nan], \
'mask_auroc': [1.0, nan]}
    """

    VALUES = {"image": ("energy_pg", "rel_mass", "rel_rank", "topk_inter", "mask_auroc")}
    higher_is_better = True

    def __init__(self, topk: float = 0.02, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        if not 0.0 < topk <= 1.0:
            raise ValueError(f"topk must be a fraction of the pixels in (0, 1], got {topk}")
        self.topk = topk

    def score(self, clip: SplitCLIP, batch: Batch, attr: Attribution, modality: str) -> Dict[str, Tensor]:
        """The five values per sample (NaN: constant map or empty object)."""
        maps = attr.image
        region = ground_truth(batch, "relevance_localization", maps.shape)
        return {"energy_pg": energy_pointing_game(maps, region), "rel_mass": relevance_mass_accuracy(maps, region),
                "rel_rank": relevance_rank_accuracy(maps, region),
                "topk_inter": topk_intersection(maps, region, self.topk), "mask_auroc": mask_auroc(maps, region)}
