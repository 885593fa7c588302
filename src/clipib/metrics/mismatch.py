"""Matched-vs-mismatched separation (AdaIB App. C): AUROC of a per-pair scalar against the matched flag.

AdaIB builds a balanced set of original and caption-shuffled pairs and asks whether a method's own
per-pair scalar ranks the two groups apart (App. C, Fig. 3, "AUC as a ranking metric"). The scalar
each method family supplies (the eval pipeline chooses it per method):

* bottleneck methods (M2IB, AdaIB): their **final loss terms** - the fit term (cosine of the
  bottlenecked embedding with the other modality) and the compression term (the KL / capacity), each
  its own AUROC;
* NIB (integrated gradients on a hidden state): :func:`map_mass` of ``text_raw`` / ``image_grid`` - by
  completeness the sum approximates ``cos(f(h)) - cos(f(0))`` (REFERENCE_NOTES §2);
* every other method: :func:`map_mass` of its raw map, or :func:`map_entropy` of its [0, 1] map (a
  diffuse map - high entropy - is the expected answer to a mismatched pair).

AdaIB's Fig. 3 shows both loss terms, and the paper's terms are **weighted**: the objective is
``f·fit - g·KL``, so :func:`weighted_terms` derives ``{m}_f_fit = f·fit`` and ``{m}_g_kl = g·KL`` from a
method's scalars (``{m}_f``, ``{m}_g``, ``{m}_fit``, ``{m}_kl``; AdaIB) for the AUROC to rank. Both depend on
f, which is computed from the clean embeddings (a monotone function of the pair's cosine for normalised
ones; raw embeddings add their norms), so they separate matched from mismatched pairs largely *by
construction*: judge them against the plain CLIP-cosine baseline, which the eval module reports once per run (``clip_cosine`` / ``auroc_clip_cos``).

The AUROC is torchmetrics' ``binary_auroc`` (exact, no binning) on dense ranks of the scalar.
:class:`MismatchAUROC` concatenates its states (``dist_reduce_fx="cat"``), which is exact under DDP too:
the AUROC of the gathered values is order-independent. ``orientation`` says which way the scalar points and
is **fixed before seeing the data**: ``"matched_high"`` (default; e.g. the fit term, the KL kept, the map
mass, the clean cosine) or ``"matched_low"`` (e.g. a loss, the weighted compression term, an entropy). An AUC
below 0.5 is then reported as such: the scalar points the other way. ``"either_optimistic"`` =
``max(AUC, 1 - AUC)`` is a pure separability score, biased upward (the direction is chosen after seeing
the data: on pure noise its expectation is above 0.5); it exists only as this explicitly named option.

:class:`MismatchScalars` (registry name ``mismatch_scalars``) records each pair's map mass and entropy
(values ``{m}_mass``, ``{m}_entropy`` for m = image, text) so that :class:`MismatchAUROC` can rank them.
"""
from __future__ import annotations

from typing import Any, Dict, Tuple

import torch
from torch import Tensor
from torchmetrics import Metric
from torchmetrics.functional.classification import binary_auroc
from torchmetrics.utilities import dim_zero_cat

from clipib.attribution.base import Attribution
from clipib.metrics.base import AttributionMetric, Batch
from clipib.models.split import SplitCLIP

__all__ = ["map_mass", "map_entropy", "mismatch_auroc", "mismatch_roc", "weighted_terms", "MismatchScalars",
           "MismatchAUROC", "ORIENTATIONS"]

ORIENTATIONS = ("matched_high", "matched_low", "either_optimistic")
"""Which way a per-pair scalar points: stated in advance (the first two) or chosen after the fact (biased)."""


def map_mass(maps: Tensor, valid: Tensor | None = None) -> Tensor:
    """Mean value of each map over its valid entries: ``[B, ...] -> [B]`` (sign kept).

    ``valid`` (bool, same shape) restricts the mean, e.g. to SOT..EOT for token scores.

    Example:
        >>> map_mass(torch.tensor([[1.0, 3.0, 5.0]]), torch.tensor([[True, True, False]]))
        tensor([2.])
    """
    x = maps.flatten(1)
    v = torch.ones_like(x, dtype=torch.bool) if valid is None else valid.flatten(1).bool()
    return (x * v).sum(1) / v.sum(1).clamp(min=1)


def map_entropy(maps: Tensor, valid: Tensor | None = None, normalized: bool = True) -> Tensor:
    """Shannon entropy (nats) of each non-negative map seen as a distribution ``p = m / sum(m)``.

    ``normalized`` divides by ``log(n_valid)`` so the value lies in [0, 1] whatever the resolution.
    A constant or all-zero map is treated as uniform: maximal entropy (1 when normalised), not NaN.
    Negative entries (signed raw maps) raise; pass the [0, 1] map.

    Example:
        >>> map_entropy(torch.tensor([[1.0, 1.0, 1.0, 1.0], [1.0, 0.0, 0.0, 0.0]]))
        tensor([1., 0.])
    """
    x = maps.flatten(1).double()
    if (x < 0).any():
        raise ValueError("map_entropy needs non-negative maps (use the [0, 1] map, not a signed raw map)")
    v = torch.ones_like(x, dtype=torch.bool) if valid is None else valid.flatten(1).bool()
    x = torch.where(v, x, torch.zeros_like(x))
    tot = x.sum(1, keepdim=True)
    uniform = v.double() / v.sum(1, keepdim=True).clamp(min=1)
    p = torch.where(tot > 0, x / tot.clamp(min=1e-300), uniform)
    h = (torch.where(p > 0, -p * p.log(), torch.zeros_like(p))).sum(1)
    if normalized:
        n = v.sum(1).double()
        h = torch.where(n > 1, h / n.clamp(min=2).log(), torch.zeros_like(h))
    return h.to(maps.dtype)


def weighted_terms(scalars: Dict[str, Tensor]) -> Dict[str, Tensor]:
    """AdaIB's weighted loss terms from a method's scalars: ``{m}_f_fit = f·fit``, ``{m}_g_kl = g·KL``.

    Only the terms whose factors are all present are returned (``{}`` for M2IB, NIB, ...).

    Example:
        >>> t = weighted_terms({"image_f": torch.tensor([2.0]), "image_fit": torch.tensor([0.3]),
        ...                     "image_g": torch.tensor([0.5]), "image_kl": torch.tensor([4.0])})
        >>> {k: round(float(v), 4) for k, v in t.items()}
        {'image_f_fit': 0.6, 'image_g_kl': 2.0}
    """
    out: Dict[str, Tensor] = {}
    for m in ("image", "text"):
        for weight, term in (("f", "fit"), ("g", "kl")):
            a, b = scalars.get(f"{m}_{weight}"), scalars.get(f"{m}_{term}")
            if a is not None and b is not None:
                out[f"{m}_{weight}_{term}"] = a.detach() * b.detach()
    return out


def _oriented(scores: Tensor, orientation: str) -> Tensor:
    if orientation == "either":
        raise ValueError("orientation 'either' is now 'either_optimistic': max(AUC, 1 - AUC) is biased upward; "
                         "state the direction in advance (matched_high / matched_low) unless you mean that")
    if orientation not in ORIENTATIONS:
        raise ValueError(f"orientation must be one of {ORIENTATIONS}, got {orientation!r}")
    return -scores if orientation == "matched_low" else scores


def _dense_rank01(x: Tensor) -> Tensor:
    """Order- and tie-preserving map of ``x`` into [0, 1] (AUROC depends on ranks only).

    torchmetrics applies a sigmoid to scores outside [0, 1], which saturates large values (e.g. a KL
    of 40 and of 60 would tie); dense ranks avoid that and keep ties as ties.
    """
    uniq, inv = torch.unique(x, return_inverse=True)
    return inv.double() / max(uniq.numel() - 1, 1)


def mismatch_auroc(scores: Tensor, matched: Tensor, orientation: str = "matched_high") -> Tensor:
    """AUROC of ``scores [N]`` for the label ``matched [N]`` (AdaIB App. C); 0.5 = no separation.

    Example:
        >>> mismatch_auroc(torch.tensor([0.9, 80.0, 0.3, 0.5]), torch.tensor([True, True, False, False]))
        tensor(1.)
    """
    scores = _oriented(scores.detach().reshape(-1).double(), orientation)
    matched = matched.reshape(-1)
    if scores.shape != matched.shape:
        raise ValueError(f"scores and matched differ in length: {scores.numel()} vs {matched.numel()}")
    if not torch.isfinite(scores).all():
        raise ValueError("scores contain NaN or inf")
    auc = binary_auroc(_dense_rank01(scores).float(), matched.long())
    return torch.maximum(auc, 1 - auc) if orientation == "either_optimistic" else auc


def mismatch_roc(scores: Tensor, matched: Tensor, orientation: str = "matched_high") -> Tuple[Tensor, Tensor]:
    """ROC curve ``(fpr [K], tpr [K])`` of ``scores [N]`` for the label ``matched [N]``, from (0, 0) to (1, 1).

    One point per distinct score (ties move together); ``orientation`` as in :func:`mismatch_auroc`, and
    ``"either_optimistic"`` flips the curve when the AUROC is below 0.5. The trapezoid area under it equals
    :func:`mismatch_auroc`.

    Example:
        >>> fpr, tpr = mismatch_roc(torch.tensor([0.9, 0.2, 0.3, 0.5]), torch.tensor([True, True, False, False]))
        >>> fpr.tolist(), tpr.tolist()
        ([0.0, 0.0, 0.5, 1.0, 1.0], [0.0, 0.5, 0.5, 0.5, 1.0])
    """
    x = _oriented(scores.detach().reshape(-1).double(), orientation)
    y = matched.reshape(-1).bool()
    if orientation == "either_optimistic" and float(mismatch_auroc(x, y)) < 0.5:
        x = -x
    uniq, inv = torch.unique(x, return_inverse=True)  # ascending
    pos = torch.zeros(len(uniq), dtype=torch.float64).index_add_(0, inv, y.double())
    neg = torch.zeros(len(uniq), dtype=torch.float64).index_add_(0, inv, (~y).double())
    tp = torch.cat([torch.zeros(1, dtype=torch.float64), pos.flip(0).cumsum(0)])  # thresholds from high to low
    fp = torch.cat([torch.zeros(1, dtype=torch.float64), neg.flip(0).cumsum(0)])
    return fp / fp[-1].clamp(min=1), tp / tp[-1].clamp(min=1)


class MismatchScalars(AttributionMetric):
    """Per-pair map mass (mean raw score) and normalised entropy of the [0, 1] map, for the AUROC.

    Values ``image_mass`` (:func:`map_mass` of ``attr.image_grid``), ``image_entropy`` (:func:`map_entropy`
    of ``attr.image``), and ``text_mass`` / ``text_entropy`` of ``attr.text_raw`` / ``attr.text`` over SOT..EOT.

    Example:
        >>> metric = MismatchScalars()
        >>> attr = Attribution(image=torch.tensor([[[1.0, 0.0], [0.0, 0.0]]]), image_grid=torch.tensor([[[2.0]]]))
        >>> metric.update(None, {}, attr, "image")
        {'image_mass': tensor([2.]), 'image_entropy': tensor([0.])}
    """

    CONSTANT_MAP = "value"  # a blank map's mass (0) and entropy (uniform) are the mismatch signal itself
    VALUES = {"image": ("image_mass", "image_entropy"), "text": ("text_mass", "text_entropy")}

    def score(self, clip: SplitCLIP, batch: Batch, attr: Attribution, modality: str) -> Dict[str, Tensor]:
        """``{m}_mass`` and ``{m}_entropy`` per pair."""
        if modality == "image":
            return {"image_mass": map_mass(attr.image_grid), "image_entropy": map_entropy(attr.image)}
        valid = clip.text.span_mask(batch["ids"], special=True)  # SOT..EOT
        return {"text_mass": map_mass(attr.text_raw, valid), "text_entropy": map_entropy(attr.text, valid)}


class MismatchAUROC(Metric):
    """Matched-vs-mismatched AUROC of a per-pair scalar (AdaIB App. C), per seed, then mean ± std over seeds.

    ``update(scores, matched, seed_index)`` adds pairs of one seed; NaN scores (a value undefined for a pair)
    are left out. ``compute()`` takes, for every seed with both matched and mismatched pairs, the AUROC of
    its pairs (:func:`mismatch_auroc`), and returns ``{"mean", "std", "n"}``: the mean over those seeds, the
    sample std over them (0 with a single seed), and ``n`` = the number of scored pairs of the last seed.
    Seeds whose pairs are all matched or all mismatched are left out; when no seed qualifies, ``compute()``
    returns ``{}`` (nothing to report). States are concatenated (``dist_reduce_fx="cat"``: exact across
    processes).

    Example:
        >>> metric = MismatchAUROC(orientation="matched_low", n_seeds=2)
        >>> metric.update(torch.tensor([0.1, 0.2]), torch.tensor([True, False]), seed_index=0)
        >>> metric.update(torch.tensor([0.4, 0.3]), torch.tensor([False, True]), seed_index=0)
        >>> metric.update(torch.tensor([0.1, 0.2, 0.3]), torch.tensor([True, True, False]), seed_index=1)
        >>> {k: round(float(v), 4) for k, v in metric.compute().items()}
        {'mean': 0.875, 'std': 0.1768, 'n': 3.0}
    """

    is_differentiable = False
    higher_is_better = True
    full_state_update = False

    def __init__(self, orientation: str = "matched_high", n_seeds: int = 1, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        _oriented(torch.zeros(1), orientation)  # validate
        if n_seeds < 1:
            raise ValueError(f"n_seeds must be >= 1, got {n_seeds}")
        self.orientation, self.n_seeds = orientation, n_seeds
        self.add_state("scores", default=[], dist_reduce_fx="cat")
        self.add_state("matched", default=[], dist_reduce_fx="cat")
        self.add_state("seed", default=[], dist_reduce_fx="cat")

    def update(self, scores: Tensor, matched: Tensor, seed_index: int = 0) -> None:
        """``scores [B]`` (the method's per-pair scalar; NaN = left out), ``matched BoolTensor[B]``."""
        scores = scores.detach().reshape(-1).double()
        matched = matched.reshape(-1).bool().to(scores.device)
        if scores.shape != matched.shape:
            raise ValueError(f"scores and matched differ in length: {scores.numel()} vs {matched.numel()}")
        if not 0 <= seed_index < self.n_seeds:
            raise IndexError(f"seed_index {seed_index} out of range for n_seeds={self.n_seeds}")
        keep = ~torch.isnan(scores)
        if torch.isinf(scores[keep]).any():
            raise ValueError("scores contain inf")
        self.scores.append(scores[keep])
        self.matched.append(matched[keep])
        self.seed.append(torch.full((int(keep.sum()),), seed_index, dtype=torch.long, device=scores.device))

    def compute(self) -> Dict[str, Tensor]:
        """``{"mean", "std", "n"}`` over the qualifying seeds (``{}`` when none qualifies)."""
        if isinstance(self.seed, list) and not self.seed:  # nothing updated on any process
            return {}
        scores, matched, seed = dim_zero_cat(self.scores), dim_zero_cat(self.matched), dim_zero_cat(self.seed)
        per_seed, n = [], 0
        for s in range(self.n_seeds):
            rows = seed == s
            flags = matched[rows].bool()
            n = int(rows.sum())
            if n and flags.any() and not flags.all():
                per_seed.append(float(mismatch_auroc(scores[rows], flags, self.orientation)))
        if not per_seed:
            return {}
        std = float(torch.tensor(per_seed).std()) if len(per_seed) > 1 else 0.0
        as_t = lambda v: torch.tensor(v, dtype=torch.float64)  # noqa: E731
        return {"mean": as_t(sum(per_seed) / len(per_seed)), "std": as_t(std), "n": as_t(float(n))}
