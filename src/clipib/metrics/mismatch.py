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

The AUROC is torchmetrics' ``binary_auroc`` (exact, no binning) on dense ranks of the scalar.
Its states are concatenated (``dist_reduce_fx="cat"``), which is exact under DDP too: the AUROC of the
gathered values is order-independent. ``orientation`` says which way the scalar points:
``"matched_high"`` (default; e.g. the fit term, the map mass), ``"matched_low"`` (e.g. a loss or an
entropy) or ``"either"`` = ``max(AUC, 1 - AUC)``, a pure separability score (optimistic when the
direction is chosen after seeing the data - prefer a stated direction).
"""
from __future__ import annotations

import torch
from torch import Tensor
from torchmetrics import Metric
from torchmetrics.functional.classification import binary_auroc
from torchmetrics.utilities import dim_zero_cat

__all__ = ["map_mass", "map_entropy", "mismatch_auroc", "MismatchAUROC"]

_ORIENTATIONS = ("matched_high", "matched_low", "either")


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


def _oriented(scores: Tensor, orientation: str) -> Tensor:
    if orientation not in _ORIENTATIONS:
        raise ValueError(f"orientation must be one of {_ORIENTATIONS}, got {orientation!r}")
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
    return torch.maximum(auc, 1 - auc) if orientation == "either" else auc


class MismatchAUROC(Metric):
    """Matched-vs-mismatched AUROC of a per-pair scalar (AdaIB App. C), torchmetrics' binary AUROC.

    States are the concatenated scores and flags (``dist_reduce_fx="cat"``: exact across processes).

    Example:
        >>> metric = MismatchAUROC(orientation="matched_low")
        >>> metric.update(torch.tensor([0.1, 0.2]), torch.tensor([True, False]))
        >>> metric.update(torch.tensor([0.4, 0.3]), torch.tensor([False, True]))
        >>> metric.compute()
        tensor(0.7500)
    """

    is_differentiable = False
    higher_is_better = True
    full_state_update = False

    def __init__(self, orientation: str = "matched_high", **kwargs) -> None:
        super().__init__(**kwargs)
        _oriented(torch.zeros(1), orientation)  # validate
        self.orientation = orientation
        self.add_state("scores", default=[], dist_reduce_fx="cat")
        self.add_state("matched", default=[], dist_reduce_fx="cat")

    def update(self, scores: Tensor, matched: Tensor) -> None:
        """``scores [B]`` (the method's per-pair scalar), ``matched BoolTensor[B]``."""
        scores = scores.detach().reshape(-1).double()
        matched = matched.reshape(-1).bool()
        if scores.shape != matched.shape:
            raise ValueError(f"scores and matched differ in length: {scores.numel()} vs {matched.numel()}")
        if not torch.isfinite(scores).all():
            raise ValueError("scores contain NaN or inf")
        self.scores.append(scores)
        self.matched.append(matched)

    def compute(self) -> Tensor:
        """AUROC in [0, 1] (``orientation="either"``: in [0.5, 1])."""
        return mismatch_auroc(dim_zero_cat(self.scores), dim_zero_cat(self.matched), self.orientation)
