"""Localization of image maps against a box / mask: percentile IoU, pointing-game IoU, pointing game.

* :func:`localization_iou` - M2IB eq. 16 (Wang et al. 2023, Sec. 4.3): binarise the map at its
  ``q``-th percentile (``q = 0.75`` in the paper) and take the IoU with the ground-truth region (the
  union of all boxes, or a mask).
* :func:`pointing_game_iou` - AdaIB (Sec. 5, "Pointing-game IoU", RefCOCOg): min-max normalise the
  map to [0, 1], binarise at ``threshold = 0.5`` and take the IoU with the box / mask.
* :func:`pointing_game` - the classic pointing game (Zhang et al. 2016): a hit when the map's maximum
  lies inside the object, optionally within ``tolerance`` pixels of it.

Conventions (clipib's choices; the papers do not state them):

* Boxes are ``xyxy`` in map pixels; pixel ``(i, j)`` (row, column) is inside a box when its centre
  ``(j + 0.5, i + 0.5)`` satisfies ``x0 <= j + 0.5 < x1`` and ``y0 <= i + 0.5 < y1``. Several boxes
  per sample (``[B, K, 4]``) are united; a row containing NaN is ignored (use it as padding). A
  target is read as a mask when it is boolean (or has the maps' shape and is not box-shaped).
* Percentile threshold: ``t`` = the linear-interpolation ``q``-quantile of the map's values (NumPy's
  default); the prediction is ``map > t`` ("scores higher than the threshold", M2IB). **Ties at the
  top**: when no pixel is strictly above ``t`` (a plateau at the maximum), the plateau ``map >= t`` is
  the prediction - so a binary map equal to the mask gives IoU 1 whatever the object's size.
* Pointing-game IoU: prediction ``normalised >= threshold``.
* **Constant maps** carry no ranking: every pixel is selected by both IoUs, which then equal the
  object's area fraction (the IoU of "everything", chance level), never NaN.
* Pointing game **ties**: every pixel equal to the maximum is a candidate and the hit is the fraction
  of candidates inside the (dilated) object - the expected hit under uniform random tie-breaking. A
  constant map therefore scores the object's area fraction, again chance level.
* A sample whose ground-truth region is empty (e.g. a box cropped away by the centre crop) cannot be
  scored: kernels return NaN and the metrics count it in ``skipped``.

Eval metrics: :class:`Localization` (registry name ``localization``, value ``iou``) and
:class:`PointingGame` (``pointing_game``, values ``pg_iou`` and ``pointing_game``). Their ground truth
comes from the batch (:func:`ground_truth`); a batch with neither ``mask`` nor ``box`` is one clear error.

* :class:`Localization`: per sample its ``mask`` where ``has_mask`` says it has one, else its ``box`` (a
  batch without ``has_mask`` uses ``mask`` when present) - M2IB's MS-CXR boxes arrive as a mask when a
  phrase has several boxes.
* :class:`PointingGame`: ``region="box"`` (default) scores the **box** even where a mask also exists, as
  AdaIB Sec. 5.3 defines the pointing-game IoU on RefCOCOg ("the ground-truth bounding box of the
  referenced object"); a batch without boxes falls back to its masks. ``region="mask"`` scores the mask
  where a sample has one: the object's exact outline, for data whose masks are the real ground truth
  (the synthetic shapes world), where a box would count background pixels as object.
"""
from __future__ import annotations

import math
from typing import Any, Dict, Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from clipib.attribution.base import Attribution
from clipib.metrics.base import AttributionMetric, Batch, nanquantile_linear
from clipib.models.split import SplitCLIP
from clipib.regions import boxes_to_mask, ground_truth

__all__ = [
    "boxes_to_mask",
    "percentile_binarize",
    "localization_iou",
    "pointing_game_iou",
    "pointing_game",
    "ground_truth",
    "Localization",
    "PointingGame",
]


def _target_mask(maps: Tensor, target: Tensor) -> Tensor:
    """Ground truth as ``BoolTensor[B, H, W]`` from a mask of the map's shape or from boxes."""
    if maps.ndim != 3:
        raise ValueError(f"maps must be [B, H, W], got shape {tuple(maps.shape)}")
    if not torch.isfinite(maps).all():
        raise ValueError("maps contain NaN or inf")
    target = target.to(maps.device)
    boxes_like = target.shape[-1] == 4 and target.shape[0] == maps.shape[0] and target.ndim in (2, 3)
    if target.dtype == torch.bool or (target.shape == maps.shape and not boxes_like):
        if target.shape != maps.shape:
            raise ValueError(f"mask must have the maps' shape {tuple(maps.shape)}, got {tuple(target.shape)}")
        return target.bool()
    if boxes_like:
        return boxes_to_mask(target, (maps.shape[1], maps.shape[2]))
    raise ValueError(
        f"target must be a mask {tuple(maps.shape)} or boxes [B, 4] / [B, K, 4], got {tuple(target.shape)}"
    )


def _iou(pred: Tensor, gt: Tensor) -> Tensor:
    """Per-sample IoU of two ``[B, H, W]`` boolean masks; NaN where the ground truth is empty."""
    inter = (pred & gt).flatten(1).sum(1).double()
    union = (pred | gt).flatten(1).sum(1).double()
    iou = inter / union.clamp(min=1)
    return torch.where(gt.flatten(1).any(1), iou, torch.full_like(iou, math.nan))


def percentile_binarize(maps: Tensor, q: float = 0.75) -> Tensor:
    """``map > quantile_q(map)``, or the top plateau ``map >= t`` when nothing is strictly above."""
    flat = maps.flatten(1).double()  # [B, N]
    t = nanquantile_linear(flat, q)[:, None]  # [B, 1]
    above = flat > t
    plateau = flat >= t
    pred = torch.where(above.any(1, keepdim=True), above, plateau)
    return pred.view_as(maps)


def localization_iou(maps: Tensor, target: Tensor, q: float = 0.75) -> Tensor:
    """M2IB eq. 16: IoU of the map binarised at its ``q``-th percentile with the box(es) / mask.

    Args:
        maps: ``[B, H, W]`` attribution maps (any scale; only the order matters).
        target: mask ``[B, H, W]`` or boxes ``[B, 4]`` / ``[B, K, 4]`` (xyxy, map pixels).
        q: percentile in [0, 1] (M2IB: 0.75).

    Returns:
        ``[B]`` IoU in [0, 1]; NaN for an empty ground truth (counted as skipped by the metric).

    Example:
        >>> m = torch.zeros(1, 4, 4); m[0, :2, :2] = 1.0
        >>> localization_iou(m, torch.tensor([[0.0, 0.0, 2.0, 2.0]]))
        tensor([1.], dtype=torch.float64)
    """
    if not 0.0 <= q <= 1.0:
        raise ValueError(f"q must be in [0, 1], got {q}")
    gt = _target_mask(maps, target)
    return _iou(percentile_binarize(maps, q), gt)


def pointing_game_iou(maps: Tensor, target: Tensor, threshold: float = 0.5) -> Tensor:
    """AdaIB pointing-game IoU: min-max normalise, binarise at ``>= threshold``, IoU with the target.

    A constant map selects every pixel (documented in the module docstring).

    Example:
        >>> m = torch.tensor([[[0.0, 0.2], [0.6, 1.0]]])
        >>> pointing_game_iou(m, torch.tensor([[[False, False], [True, True]]]))
        tensor([1.], dtype=torch.float64)
    """
    gt = _target_mask(maps, target)
    flat = maps.flatten(1).double()  # [B, N]
    lo, hi = flat.min(1, keepdim=True).values, flat.max(1, keepdim=True).values
    norm = torch.where(hi > lo, (flat - lo) / (hi - lo).clamp(min=1e-300), torch.ones_like(flat))
    return _iou((norm >= threshold).view_as(maps), gt)


def _dilate(mask: Tensor, tolerance: float) -> Tensor:
    """Pixels within Euclidean distance ``tolerance`` (pixel centres) of the mask."""
    r = int(math.floor(tolerance))
    if r <= 0:
        return mask
    d = torch.arange(-r, r + 1, device=mask.device, dtype=torch.float32)
    disc = ((d[:, None] ** 2 + d[None, :] ** 2) <= tolerance**2).float()[None, None]  # [1, 1, k, k]
    hits = F.conv2d(mask[:, None].float(), disc, padding=r)  # [B, 1, H, W]
    return hits[:, 0] > 0


def pointing_game(maps: Tensor, target: Tensor, tolerance: float = 0.0) -> Tensor:
    """Classic pointing game: is the map's maximum inside the object (within ``tolerance`` px)?

    Ties: the fraction of maximal pixels inside (expected hit under random tie-breaking).

    Returns:
        ``[B]`` in [0, 1] (exactly 0 or 1 when the maximum is unique); NaN for an empty target.

    Example:
        >>> m = torch.zeros(1, 5, 5); m[0, 0, 0] = 1.0
        >>> box = torch.tensor([[2.0, 0.0, 5.0, 5.0]])
        >>> pointing_game(m, box), pointing_game(m, box, tolerance=2)
        (tensor([0.], dtype=torch.float64), tensor([1.], dtype=torch.float64))
    """
    if tolerance < 0:
        raise ValueError(f"tolerance must be >= 0, got {tolerance}")
    gt = _target_mask(maps, target)
    zone = _dilate(gt, tolerance).flatten(1)  # [B, N]
    flat = maps.flatten(1)
    top = flat == flat.max(1, keepdim=True).values  # [B, N]
    hit = (top & zone).sum(1).double() / top.sum(1).double()
    return torch.where(gt.flatten(1).any(1), hit, torch.full_like(hit, math.nan))


class Localization(AttributionMetric):
    """M2IB localization (eq. 16): IoU of the image map binarised at its ``q``-th percentile with the object.

    Value ``iou`` (image modality); see :func:`localization_iou` and :func:`ground_truth`.

    Example:
        >>> metric = Localization(q=0.75)
        >>> m = torch.zeros(2, 4, 4); m[:, :2, :2] = 1.0
        >>> batch = {"box": torch.tensor([[0.0, 0.0, 2.0, 2.0], [0.0, 0.0, 4.0, 4.0]])}
        >>> metric.update(None, batch, Attribution(image=m), "image")
        {'iou': tensor([1.0000, 0.2500], dtype=torch.float64)}
        >>> metric.compute()["iou"]["mean"]
        tensor(0.6250, dtype=torch.float64)
    """

    VALUES = {"image": ("iou",)}
    higher_is_better = True

    def __init__(self, q: float = 0.75, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        if not 0.0 <= q <= 1.0:
            raise ValueError(f"q must be in [0, 1], got {q}")
        self.q = q

    def score(self, clip: SplitCLIP, batch: Batch, attr: Attribution, modality: str) -> Dict[str, Tensor]:
        """``iou`` per sample (NaN for an empty ground truth)."""
        return {"iou": localization_iou(attr.image, ground_truth(batch, "localization", attr.image.shape), self.q)}


class PointingGame(AttributionMetric):
    """AdaIB's pointing-game IoU (normalised map ``>= threshold``) and the classic pointing game.

    Values ``pg_iou`` (:func:`pointing_game_iou`) and ``pointing_game`` (:func:`pointing_game`), image modality.

    Args:
        threshold: binarisation threshold of the [0, 1]-normalised map (AdaIB: 0.5).
        tolerance: pixels around the object that still count as a hit (classic pointing game).
        region: ``"box"`` (default; AdaIB Sec. 5.3 scores the ground-truth box, also where a mask exists) or
            ``"mask"`` (the mask where the sample has one, else the box: exact outlines, e.g. the shapes world).

    Example:
        >>> metric = PointingGame(threshold=0.5, tolerance=0)
        >>> batch = {"box": torch.tensor([[1.0, 0.0, 2.0, 1.0]])}
        >>> metric.update(None, batch, Attribution(image=torch.tensor([[[0.0, 1.0], [0.0, 1.0]]])), "image")
        {'pg_iou': tensor([0.5000], dtype=torch.float64), 'pointing_game': tensor([0.5000], dtype=torch.float64)}
    """

    VALUES = {"image": ("pg_iou", "pointing_game")}
    higher_is_better = True

    def __init__(self, threshold: float = 0.5, tolerance: float = 0.0, region: Literal["box", "mask"] = "box",
                 **kwargs: Any) -> None:
        super().__init__(**kwargs)
        if tolerance < 0:
            raise ValueError(f"tolerance must be >= 0, got {tolerance}")
        if region not in ("box", "mask"):
            raise ValueError(f"region must be 'box' or 'mask', got {region!r}")
        self.threshold, self.tolerance, self.region = threshold, tolerance, region

    def score(self, clip: SplitCLIP, batch: Batch, attr: Attribution, modality: str) -> Dict[str, Tensor]:
        """``pg_iou`` and ``pointing_game`` per sample (NaN for an empty ground truth)."""
        region = ground_truth(batch, "pointing_game", attr.image.shape, prefer=self.region)
        return {"pg_iou": pointing_game_iou(attr.image, region, self.threshold),
                "pointing_game": pointing_game(attr.image, region, self.tolerance)}
