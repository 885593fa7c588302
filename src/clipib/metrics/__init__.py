"""clipib's evaluation metrics: functional kernels plus torchmetrics ``Metric`` classes with summed states.

Families (one module each): :mod:`~clipib.metrics.confidence` (M2IB eqs. 17-18, protocols
``corrected`` / ``m2ib`` / ``nib``), :mod:`~clipib.metrics.localization` (M2IB eq. 16, AdaIB's
pointing-game IoU, the classic pointing game), :mod:`~clipib.metrics.ehr` (InputIBA App. F),
:mod:`~clipib.metrics.insertion_deletion` (InputIBA App. D.3), :mod:`~clipib.metrics.mismatch`
(AdaIB App. C), :mod:`~clipib.metrics.text_localization` (gold tokens in the top-k), and the
model-side scorers in :mod:`~clipib.metrics.scoring`.
"""
from clipib.metrics._base import SampleMeanMetric, nanquantile_linear
from clipib.metrics.confidence import (
    PROTOCOLS,
    ConfidenceDrop,
    ConfidenceIncrease,
    confidence_drop,
    confidence_increase,
    duplicate_product_factors,
    image_confidence_scores,
    legacy_pool_positions,
    median_mask,
    perturb_image,
    strip_special,
    text_confidence_scores,
)
from clipib.metrics.ehr import EffectiveHeatRatio, effective_heat_ratio, ehr_curve
from clipib.metrics.insertion_deletion import (
    InsertionDeletion,
    blur_params,
    blurred_canvas,
    deletion_fill,
    image_insertion_deletion,
    text_insertion_deletion,
)
from clipib.metrics.localization import (
    LocalizationIoU,
    PointingGame,
    PointingGameIoU,
    boxes_to_mask,
    localization_iou,
    percentile_binarize,
    pointing_game,
    pointing_game_iou,
)
from clipib.metrics.mismatch import MismatchAUROC, map_entropy, map_mass, mismatch_auroc
from clipib.metrics.scoring import cosine, image_scorer, text_scorer
from clipib.metrics.text_localization import TopKGoldHit, TopKGoldShare, content_positions, topk_gold

__all__ = [
    "SampleMeanMetric", "nanquantile_linear",
    "PROTOCOLS", "ConfidenceDrop", "ConfidenceIncrease", "confidence_drop", "confidence_increase",
    "duplicate_product_factors", "image_confidence_scores", "legacy_pool_positions", "median_mask",
    "perturb_image", "strip_special", "text_confidence_scores",
    "EffectiveHeatRatio", "effective_heat_ratio", "ehr_curve",
    "InsertionDeletion", "blur_params", "blurred_canvas", "deletion_fill",
    "image_insertion_deletion", "text_insertion_deletion",
    "LocalizationIoU", "PointingGame", "PointingGameIoU", "boxes_to_mask", "localization_iou",
    "percentile_binarize", "pointing_game", "pointing_game_iou",
    "MismatchAUROC", "map_entropy", "map_mass", "mismatch_auroc",
    "cosine", "image_scorer", "text_scorer",
    "TopKGoldHit", "TopKGoldShare", "content_positions", "topk_gold",
]
