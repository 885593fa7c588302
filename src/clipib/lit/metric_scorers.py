"""Scorers for the metric suite (:mod:`clipib.metrics`), registered in :data:`clipib.lit.scorers.SCORERS`.

Each scorer adapts one metric family to the eval pipeline's per-sample interface
``scorer(clip, batch, attr, modality) -> {name: Tensor[B]}``; the values are aggregated (mean ± std, NaN
counted as skipped) and written to the per-sample records by the pipeline. ``metrics:`` keys (settings,
defaults) and the values each produces:

- ``confidence`` (``protocol="corrected"``, ``replacement_id=0``): ``{m}_drop``, ``{m}_incr`` for m = image, text
- ``localization`` (``q=0.75``): ``iou`` (image)
- ``pointing_game`` (``threshold=0.5``, ``tolerance=0``): ``pg_iou``, ``pointing_game`` (image)
- ``ehr`` (``weighted=True``, ``max_roi_fraction=0.33``): ``ehr`` (image)
- ``insertion_deletion`` (``steps=20``, ``fill="black"``, ``replacement_id=0``): ``{m}_insertion``,
  ``{m}_deletion`` for m = image, text
- ``text_topk`` (``k=2``): ``topk_share``, ``topk_hit`` (text)
- ``mismatch_scalars``: ``{m}_mass``, ``{m}_entropy`` for m = image, text

Ground truth comes from the batch: per sample its ``mask`` where ``has_mask`` says it has one, else its
``box`` (a batch without ``has_mask`` uses ``mask`` when present) for the image localization metrics;
``gold_tokens`` for ``text_topk``; a configured metric without its ground truth is one clear error.
The matched-vs-mismatched AUROC is a dataset-level number: ``mismatch_scalars`` records each pair's map
mass / entropy (bottleneck methods also put their final loss terms in ``attr.scalars``), and
:class:`clipib.metrics.MismatchAUROC` turns those and ``batch["matched"]`` into the AUROC.
"""
from __future__ import annotations

from typing import Any, Dict, List, Sequence

import torch
from torch import Tensor

from clipib.attribution import Attribution
from clipib.lit.scorers import register_scorer
from clipib.metrics import (
    PROTOCOLS,
    boxes_to_mask,
    confidence_drop,
    confidence_increase,
    content_positions,
    effective_heat_ratio,
    image_confidence_scores,
    image_insertion_deletion,
    image_scorer,
    localization_iou,
    map_entropy,
    map_mass,
    pointing_game,
    pointing_game_iou,
    text_confidence_scores,
    text_insertion_deletion,
    text_scorer,
    topk_gold,
)
from clipib.models.split import SplitCLIP


def _region(batch: Dict[str, Any], metric: str, size: Sequence[int]) -> Tensor:
    """The object region ``BoolTensor[B, H, W]``: the mask where the sample has one (``has_mask``), else its box."""
    mask, box = batch.get("mask"), batch.get("box")
    if mask is None and box is None:
        raise ValueError(f"metric {metric!r} needs batch['mask'] or batch['box'] (a grounding dataset)")
    if mask is None:
        return boxes_to_mask(box, (size[-2], size[-1]))
    has_mask = batch.get("has_mask")
    if box is None or has_mask is None:
        return mask.bool()
    return torch.where(has_mask.bool()[:, None, None], mask.bool(), boxes_to_mask(box, (size[-2], size[-1])))


@register_scorer("confidence")
class ConfidenceScorer:
    """Confidence Drop / Increase (M2IB eqs. 17-18) under ``protocol`` (see :mod:`clipib.metrics.confidence`)."""

    def __init__(self, protocol: str = "corrected", replacement_id: int = 0) -> None:
        if protocol not in PROTOCOLS:
            raise ValueError(f"confidence protocol must be one of {PROTOCOLS}, got {protocol!r}")
        self.protocol, self.replacement_id = protocol, replacement_id

    def names(self, modality: str) -> List[str]:
        return [f"{modality}_drop", f"{modality}_incr"]

    def __call__(self, clip: SplitCLIP, batch: Dict[str, Any], attr: Attribution, modality: str) -> Dict[str, Tensor]:
        images, ids = batch["image"], batch["ids"]
        if modality == "image":
            orig, pert = image_confidence_scores(clip, images, attr.image, ids, self.protocol)
        else:
            orig, pert = text_confidence_scores(clip, images, ids, attr.text, self.protocol, self.replacement_id)
        return {f"{modality}_drop": confidence_drop(orig, pert), f"{modality}_incr": confidence_increase(orig, pert)}


@register_scorer("localization")
class LocalizationScorer:
    """IoU of the map binarised at its ``q``-th percentile with the object (M2IB eq. 16)."""

    def __init__(self, q: float = 0.75) -> None:
        self.q = q

    def names(self, modality: str) -> List[str]:
        return ["iou"] if modality == "image" else []

    def __call__(self, clip: SplitCLIP, batch: Dict[str, Any], attr: Attribution, modality: str) -> Dict[str, Tensor]:
        if modality != "image":
            return {}
        return {"iou": localization_iou(attr.image, _region(batch, "localization", attr.image.shape), self.q)}


@register_scorer("pointing_game")
class PointingGameScorer:
    """AdaIB's pointing-game IoU (normalised map ``>= threshold``) and the classic pointing game."""

    def __init__(self, threshold: float = 0.5, tolerance: float = 0.0) -> None:
        self.threshold, self.tolerance = threshold, tolerance

    def names(self, modality: str) -> List[str]:
        return ["pg_iou", "pointing_game"] if modality == "image" else []

    def __call__(self, clip: SplitCLIP, batch: Dict[str, Any], attr: Attribution, modality: str) -> Dict[str, Tensor]:
        if modality != "image":
            return {}
        region = _region(batch, "pointing_game", attr.image.shape)
        return {"pg_iou": pointing_game_iou(attr.image, region, self.threshold),
                "pointing_game": pointing_game(attr.image, region, self.tolerance)}


@register_scorer("ehr")
class EHRScorer:
    """Effective Heat Ratio (InputIBA App. F); objects covering more than ``max_roi_fraction`` give NaN."""

    def __init__(self, weighted: bool = True, max_roi_fraction: float = 0.33) -> None:
        self.weighted, self.max_roi_fraction = weighted, max_roi_fraction

    def names(self, modality: str) -> List[str]:
        return ["ehr"] if modality == "image" else []

    def __call__(self, clip: SplitCLIP, batch: Dict[str, Any], attr: Attribution, modality: str) -> Dict[str, Tensor]:
        if modality != "image":
            return {}
        region = _region(batch, "ehr", attr.image.shape)
        return {"ehr": effective_heat_ratio(attr.image, region, weighted=self.weighted,
                                            max_roi_fraction=self.max_roi_fraction)}


@register_scorer("insertion_deletion")
class InsertionDeletionScorer:
    """Insertion and deletion AUC (InputIBA App. D.3), cosine with the other modality at each step."""

    def __init__(self, steps: int = 20, fill: Any = "black", replacement_id: int = 0) -> None:
        self.steps, self.fill, self.replacement_id = steps, fill, replacement_id

    def names(self, modality: str) -> List[str]:
        return [f"{modality}_insertion", f"{modality}_deletion"]

    def __call__(self, clip: SplitCLIP, batch: Dict[str, Any], attr: Attribution, modality: str) -> Dict[str, Tensor]:
        images, ids = batch["image"], batch["ids"]
        score = image_scorer(clip, ids) if modality == "image" else text_scorer(clip, images, ids)
        out = {}
        for mode in ("insertion", "deletion"):
            if modality == "image":
                auc = image_insertion_deletion(images, attr.image, score, mode, self.steps, self.fill)[0]
            else:
                auc = text_insertion_deletion(ids, attr.text, score, mode, self.steps, self.replacement_id,
                                              clip.text.eot_positions(ids))[0]
            out[f"{modality}_{mode}"] = auc
        return out


@register_scorer("text_topk")
class TextTopKScorer:
    """Share of the gold tokens among the top-``k`` content tokens, and the all-gold hit."""

    def __init__(self, k: int = 2) -> None:
        self.k = k

    def names(self, modality: str) -> List[str]:
        return ["topk_share", "topk_hit"] if modality == "text" else []

    def __call__(self, clip: SplitCLIP, batch: Dict[str, Any], attr: Attribution, modality: str) -> Dict[str, Tensor]:
        if modality != "text":
            return {}
        if batch.get("gold_tokens") is None:
            raise ValueError("metric 'text_topk' needs batch['gold_tokens']")
        ids = batch["ids"]
        share, hit = topk_gold(attr.text, batch["gold_tokens"], ids, self.k, eot=clip.text.eot_positions(ids))
        return {"topk_share": share, "topk_hit": hit}


@register_scorer("mismatch_scalars")
class MismatchScalarsScorer:
    """Per-pair map mass (mean raw score) and normalised entropy of the [0, 1] map, for the AUROC."""

    def names(self, modality: str) -> List[str]:
        return [f"{modality}_mass", f"{modality}_entropy"]

    def __call__(self, clip: SplitCLIP, batch: Dict[str, Any], attr: Attribution, modality: str) -> Dict[str, Tensor]:
        if modality == "image":
            return {"image_mass": map_mass(attr.image_grid), "image_entropy": map_entropy(attr.image)}
        valid = content_positions(batch["ids"], clip.text.eot_positions(batch["ids"]), include_special=True)
        return {"text_mass": map_mass(attr.text_raw, valid), "text_entropy": map_entropy(attr.text, valid)}
