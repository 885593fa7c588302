"""Ground-truth regions of an eval batch (the batch contract's ``mask`` / ``has_mask`` / ``box``) as pixel masks.

Shared by the localisation metrics (:mod:`clipib.metrics`) and the ground-truth ``oracle`` method
(:mod:`clipib.attribution.baselines.oracle`); depends on torch only, so both layers can use it.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import torch
from torch import Tensor

__all__ = ["boxes_to_mask", "ground_truth"]


def boxes_to_mask(boxes: Tensor, size: tuple[int, int]) -> Tensor:
    """Union of ``xyxy`` boxes ``[B, 4]`` or ``[B, K, 4]`` as a mask ``BoolTensor[B, H, W]``.

    Example:
        >>> boxes_to_mask(torch.tensor([[1.0, 0.0, 3.0, 2.0]]), (3, 4)).int()
        tensor([[[0, 1, 1, 0],
                 [0, 1, 1, 0],
                 [0, 0, 0, 0]]], dtype=torch.int32)
    """
    if boxes.ndim == 2:
        boxes = boxes[:, None]
    if boxes.ndim != 3 or boxes.shape[-1] != 4:
        raise ValueError(f"boxes must be [B, 4] or [B, K, 4] (xyxy), got shape {tuple(boxes.shape)}")
    h, w = size
    b = boxes.to(torch.float32)[..., None, None]  # [B, K, 4, 1, 1]
    ys = torch.arange(h, device=boxes.device, dtype=torch.float32)[:, None] + 0.5  # [H, 1]
    xs = torch.arange(w, device=boxes.device, dtype=torch.float32)[None, :] + 0.5  # [1, W]
    inside = (xs >= b[:, :, 0]) & (xs < b[:, :, 2]) & (ys >= b[:, :, 1]) & (ys < b[:, :, 3])  # [B, K, H, W]
    return inside.any(dim=1)


def ground_truth(batch: Mapping[str, Any], metric: str, size: Sequence[int], prefer: str = "mask") -> Tensor:
    """The object region ``BoolTensor[B, H, W]`` of an eval batch; ``size`` ends with ``(H, W)``.

    ``prefer="mask"`` (default): the mask where the sample has one (``has_mask``), else its box.
    ``prefer="box"``: the box whenever the batch has boxes, even where a mask also exists (AdaIB Sec. 5.3
    scores the pointing game against the ground-truth box); a batch without boxes falls back to its masks.
    ``metric`` names the caller in the error.

    Example:
        >>> batch = {"box": torch.tensor([[0.0, 0.0, 1.0, 1.0]] * 2), "mask": torch.ones(2, 2, 2),
        ...          "has_mask": torch.tensor([True, False])}
        >>> ground_truth(batch, "iou", (2, 2, 2)).int().tolist()
        [[[1, 1], [1, 1]], [[1, 0], [0, 0]]]
    """
    if prefer not in ("mask", "box"):
        raise ValueError(f"prefer must be 'mask' or 'box', got {prefer!r}")
    mask, box = batch.get("mask"), batch.get("box")
    if mask is None and box is None:
        raise ValueError(f"metric {metric!r} needs batch['mask'] or batch['box'] (a grounding dataset)")
    hw = (int(size[-2]), int(size[-1]))
    if mask is None or (prefer == "box" and box is not None):
        return boxes_to_mask(box, hw)
    has_mask = batch.get("has_mask")
    if box is None or has_mask is None:
        return mask.bool()
    return torch.where(has_mask.bool()[:, None, None], mask.bool(), boxes_to_mask(box, hw))
