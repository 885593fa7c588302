"""clipib's evaluation metrics: functional kernels plus one torchmetrics ``Metric`` per family, which eval runs.

Every eval metric is an :class:`~clipib.metrics.base.AttributionMetric`: built from its config settings
(``METRICS[name](n_seeds=len(seeds), **settings)``), it scores a batch's attribution per sample
(``update(clip, batch, attr, modality, seed_index)``) and aggregates mean ± std over samples and seeds
with summed states (:class:`~clipib.metrics.base.SeedMeanStd`), exact under multi-process sync.

Families (one module each, kernels + metric): :mod:`~clipib.metrics.confidence` (M2IB eqs. 17-18, protocols
``corrected`` / ``m2ib`` / ``nib``), :mod:`~clipib.metrics.localization` (M2IB eq. 16, AdaIB's pointing-game
IoU, the classic pointing game), :mod:`~clipib.metrics.ehr` (InputIBA App. F),
:mod:`~clipib.metrics.insertion_deletion` (InputIBA App. D.3), :mod:`~clipib.metrics.text_localization`
(gold tokens in the top-k), :mod:`~clipib.metrics.mismatch` (AdaIB App. C: per-pair scalars and the
AUROC), :mod:`~clipib.metrics.similarity` (the pair's cosine), :mod:`~clipib.metrics.perturbation` (MoRF /
LeRF / ABPC with ROAD's imputation), :mod:`~clipib.metrics.faithfulness_correlation` (Bhatt et al. 2020),
:mod:`~clipib.metrics.complexity` (sparseness, complexity) and :mod:`~clipib.metrics.relevance_localization`
(energy pointing game, relevance mass / rank accuracy, top-k intersection, mask AUROC),
:mod:`~clipib.metrics.retrieval_roar` (AdaIB App. F: retrieval ROAR without retraining, dataset-level, on the
removal kernel :mod:`clipib.removal`),
and the metrics that re-run the method (``needs_method``): :mod:`~clipib.metrics.randomisation` (model-randomisation
and other-target sanity checks) and :mod:`~clipib.metrics.robustness` (max/avg sensitivity, seed stability), on the
kernels of :mod:`~clipib.metrics.map_similarity`. Adding a metric: one module with its
kernel and its ``AttributionMetric`` subclass, plus one line in :data:`METRICS` (docs/metrics.md).
"""
from typing import Dict, Type

from clipib.metrics.base import AttributionMetric, SeedMeanStd, average_ranks, nanquantile_linear
from clipib.metrics.complexity import ComplexityMetrics, complexity, sparseness
from clipib.metrics.confidence import (
    PROTOCOLS,
    Confidence,
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
from clipib.metrics.faithfulness_correlation import (
    FaithfulnessCorrelation,
    faithfulness_correlation,
    pearson_rows,
    random_subsets,
)
from clipib.metrics.insertion_deletion import (
    InsertionDeletion,
    blur_params,
    blurred_canvas,
    deletion_fill,
    image_insertion_deletion,
    image_scorer,
    text_insertion_deletion,
    text_scorer,
)
from clipib.metrics.localization import (
    Localization,
    PointingGame,
    boxes_to_mask,
    ground_truth,
    localization_iou,
    percentile_binarize,
    pointing_game,
    pointing_game_iou,
)
from clipib.metrics.map_similarity import compare, rerun, spearman, ssim, topk_overlap
from clipib.metrics.mismatch import (
    ORIENTATIONS,
    MismatchAUROC,
    MismatchScalars,
    map_entropy,
    map_mass,
    mismatch_auroc,
    mismatch_roc,
    weighted_terms,
)
from clipib.metrics.perturbation import (
    PerturbationCurves,
    chunked_scores,
    image_fill,
    image_perturbation_curves,
    pair_scorers,
    road_impute,
    text_perturbation_curves,
)
from clipib.metrics.relevance_localization import (
    RelevanceLocalization,
    energy_pointing_game,
    mask_auroc,
    relevance_mass_accuracy,
    relevance_rank_accuracy,
    topk_intersection,
    topk_weights,
)
from clipib.metrics.randomisation import ModelRandomisation, OtherTarget, randomise_tower_, reinitialise_
from clipib.metrics.retrieval_roar import RetrievalROAR, retrieval_accuracy, retrieval_hits, roar_score
from clipib.metrics.robustness import SeedStability, Sensitivity, pixel_noise, relative_change
from clipib.metrics.similarity import Similarity, pair_cosine
from clipib.metrics.text_localization import TextTopK, topk_gold
from clipib.metrics.throughput import Throughput

METRICS: Dict[str, Type[AttributionMetric]] = {
    "confidence": Confidence,
    "localization": Localization,
    "pointing_game": PointingGame,
    "ehr": EffectiveHeatRatio,
    "insertion_deletion": InsertionDeletion,
    "text_topk": TextTopK,
    "mismatch_scalars": MismatchScalars,
    "similarity": Similarity,
    "model_randomisation": ModelRandomisation,
    "other_target": OtherTarget,
    "sensitivity": Sensitivity,
    "seed_stability": SeedStability,
    "perturbation": PerturbationCurves,
    "faithfulness_correlation": FaithfulnessCorrelation,
    "complexity": ComplexityMetrics,
    "relevance_localization": RelevanceLocalization,
    "retrieval_roar": RetrievalROAR,
}
"""The eval metrics by config name (``metrics:`` keys); each takes ``n_seeds`` plus its own settings."""

__all__ = [
    "METRICS", "AttributionMetric", "SeedMeanStd", "Throughput", "average_ranks", "nanquantile_linear",
    "PROTOCOLS", "Confidence", "confidence_drop", "confidence_increase", "duplicate_product_factors",
    "image_confidence_scores", "legacy_pool_positions", "median_mask", "perturb_image", "strip_special",
    "text_confidence_scores",
    "EffectiveHeatRatio", "effective_heat_ratio", "ehr_curve",
    "InsertionDeletion", "blur_params", "blurred_canvas", "deletion_fill", "image_insertion_deletion",
    "image_scorer", "text_insertion_deletion", "text_scorer",
    "Localization", "PointingGame", "boxes_to_mask", "ground_truth", "localization_iou", "percentile_binarize",
    "pointing_game", "pointing_game_iou",
    "MismatchAUROC", "MismatchScalars", "map_entropy", "map_mass", "mismatch_auroc", "mismatch_roc", "weighted_terms",
    "ORIENTATIONS",
    "Similarity", "pair_cosine",
    "TextTopK", "topk_gold",
    "compare", "rerun", "spearman", "ssim", "topk_overlap",
    "ModelRandomisation", "OtherTarget", "randomise_tower_", "reinitialise_",
    "SeedStability", "Sensitivity", "pixel_noise", "relative_change",
    "PerturbationCurves", "chunked_scores", "image_fill", "image_perturbation_curves", "pair_scorers", "road_impute",
    "text_perturbation_curves",
    "FaithfulnessCorrelation", "faithfulness_correlation", "pearson_rows", "random_subsets",
    "ComplexityMetrics", "complexity", "sparseness",
    "RelevanceLocalization", "average_ranks", "energy_pointing_game", "mask_auroc", "relevance_mass_accuracy",
    "relevance_rank_accuracy", "topk_intersection", "topk_weights",
    "RetrievalROAR", "retrieval_accuracy", "retrieval_hits", "roar_score",
]
