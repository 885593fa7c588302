"""Effective Heat Ratio (EHR), InputIBA (Zhang et al. 2021), App. F and its evaluation protocol.

For a heat map ``h`` in [0, 1] and a region of interest (ROI):

1. heat below ``base_threshold = 0.1`` is ignored (set to 0);
2. for the 11 quantile levels ``q in {0, 0.1, ..., 1}`` of the remaining heat (``h >= 0.1``) the
   threshold is ``t_q = min(quantile_q, 0.99 * max(h))`` (the cap keeps the top plateau selected);
3. the ratio at ``t_q`` is ``sum_{h >= t_q, in ROI} w / #{h >= t_q}`` with ``w = h`` (heat-weighted,
   InputIBA's default) or ``w = 1`` (unweighted);
4. EHR = trapezoidal area under the ratio curve over ``q`` in [0, 1].

Samples whose ROI covers more than ``max_roi_fraction = 0.33`` of the image are skipped (InputIBA
evaluates EHR only on objects covering < 33 %); samples with an empty ROI are skipped as well. A
skipped sample gives NaN in the kernel and is **counted** in the metric's ``skipped`` state.

The map is used on its own scale (InputIBA divides 8-bit PNG maps by 255): EHR is *not* invariant
to rescaling - App. F's example (c), heat 0.25 inside the box and 0 outside, has EHR 0.25 ("0.2" in
its figure) while (a), heat 1 inside, has EHR 1. Pass maps in [0, 1] (clipib's ``Attribution.image``).
Values of documented edge cases: a map with no heat ``>= 0.1`` has EHR 0; a constant map ``c >= 0.1``
has EHR ``c * roi_fraction`` (weighted) or ``roi_fraction`` (unweighted).

:class:`EffectiveHeatRatio` is the eval metric (registry name ``ehr``, value ``ehr``); its ROI is the
batch's ground truth (:func:`clipib.regions.ground_truth`).
"""
from __future__ import annotations

import math
from typing import Any, Dict

import torch
from torch import Tensor

from clipib.attribution.base import Attribution
from clipib.metrics.base import AttributionMetric, Batch, nanquantile_linear
from clipib.metrics.localization import _target_mask
from clipib.regions import ground_truth
from clipib.models.split import SplitCLIP

__all__ = ["ehr_curve", "effective_heat_ratio", "EffectiveHeatRatio"]


def ehr_curve(
    maps: Tensor,
    target: Tensor,
    *,
    weighted: bool = True,
    base_threshold: float = 0.1,
    num_quantiles: int = 11,
    max_roi_fraction: float = 0.33,
) -> tuple[Tensor, Tensor]:
    """The EHR ratio curve: ``(levels [Q], ratios [B, Q])``; rows of skipped samples are NaN.

    Args:
        maps: ``[B, H, W]`` heat maps in [0, 1].
        target: ROI mask ``[B, H, W]`` or boxes ``[B, 4]`` / ``[B, K, 4]`` (xyxy, map pixels).
        weighted: weight in-ROI pixels by their heat (InputIBA's default) or count them.
        base_threshold: heat below this is ignored (InputIBA: 0.1).
        num_quantiles: number of quantile levels, evenly spaced in [0, 1] (InputIBA: 11).
        max_roi_fraction: samples whose ROI covers more than this are skipped (InputIBA: 0.33).
    """
    roi = _target_mask(maps, target).flatten(1)  # [B, N]
    heat = maps.flatten(1).double()  # [B, N]
    heat = torch.where(heat >= base_threshold, heat, torch.zeros_like(heat))
    levels = torch.linspace(0.0, 1.0, num_quantiles, dtype=torch.float64, device=maps.device)  # [Q]
    poi = torch.where(heat > 0, heat, torch.full_like(heat, math.nan))  # heat >= base_threshold
    cap = 0.99 * heat.max(1, keepdim=True).values  # [B, 1]
    t = torch.minimum(nanquantile_linear(poi, levels), cap)  # [B, Q], NaN when no heat
    w = torch.where(roi, heat if weighted else torch.ones_like(heat), torch.zeros_like(heat))  # [B, N]
    cols = []
    for i in range(num_quantiles):  # a loop keeps memory at [B, N]
        above = heat >= t[:, i : i + 1]  # [B, N]
        cols.append((w * above).sum(1) / above.sum(1).double().clamp(min=1))
    ratios = torch.stack(cols, dim=1)  # [B, Q]
    no_heat = ~(heat > 0).any(1, keepdim=True)  # [B, 1]
    ratios = torch.where(no_heat, torch.zeros_like(ratios), ratios)
    frac = roi.double().mean(1, keepdim=True)  # [B, 1]
    skip = (frac > max_roi_fraction) | (frac == 0)
    ratios = torch.where(skip, torch.full_like(ratios, math.nan), ratios)
    return levels, ratios


def effective_heat_ratio(
    maps: Tensor,
    target: Tensor,
    *,
    weighted: bool = True,
    base_threshold: float = 0.1,
    num_quantiles: int = 11,
    max_roi_fraction: float = 0.33,
) -> Tensor:
    """Per-sample EHR ``[B]`` (InputIBA App. F); NaN for skipped samples (ROI > 33 % or empty).

    Example (InputIBA Fig. 11 (b): object 25 %, heat 1 inside, 0.25 outside):
        >>> m = torch.full((1, 4, 4), 0.25); m[0, :2, :2] = 1.0
        >>> box = torch.tensor([[0.0, 0.0, 2.0, 2.0]])
        >>> effective_heat_ratio(m, box)
        tensor([0.4375], dtype=torch.float64)
    """
    levels, ratios = ehr_curve(
        maps, target, weighted=weighted, base_threshold=base_threshold,
        num_quantiles=num_quantiles, max_roi_fraction=max_roi_fraction,
    )
    return torch.trapezoid(ratios, levels, dim=-1)


class EffectiveHeatRatio(AttributionMetric):
    """EHR (InputIBA App. F) of the image map with the batch's object; value ``ehr`` (image modality).

    Objects covering more than ``max_roi_fraction`` (or nothing) give NaN, counted in ``skipped``.

    Example:
        >>> metric = EffectiveHeatRatio(weighted=True)
        >>> m = torch.zeros(2, 4, 4); m[:, :2, :2] = 1.0
        >>> batch = {"box": torch.tensor([[0.0, 0.0, 2.0, 2.0], [0.0, 0.0, 4.0, 4.0]])}
        >>> metric.update(None, batch, Attribution(image=m), "image")
        {'ehr': tensor([1.0000,    nan], dtype=torch.float64)}
        >>> {k: round(float(v), 6) for k, v in metric.compute()["ehr"].items()}
        {'mean': 1.0, 'std': 0.0, 'n': 1.0, 'skipped': 1.0, 'std_over_seeds': 0.0}
    """

    VALUES = {"image": ("ehr",)}
    higher_is_better = True

    def __init__(self, weighted: bool = True, max_roi_fraction: float = 0.33, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.weighted, self.max_roi_fraction = weighted, max_roi_fraction

    def score(self, clip: SplitCLIP, batch: Batch, attr: Attribution, modality: str) -> Dict[str, Tensor]:
        """``ehr`` per sample (NaN for a skipped object)."""
        region = ground_truth(batch, "ehr", attr.image.shape)
        return {"ehr": effective_heat_ratio(attr.image, region, weighted=self.weighted,
                                            max_roi_fraction=self.max_roi_fraction)}
