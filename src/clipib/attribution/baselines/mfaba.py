"""MFABA (Zhu et al., AAAI 2024, "MFABA: A More Faithful and Accelerated Boundary-based Attribution Method").

MFABA walks from the input ``x_0`` towards the decision boundary by gradient steps that *decrease* the
target output (an adversarial attack, gradient ascent on the loss), and attributes along that path with
first-order terms only: ``A = Σ_t ∇f(x_t) ⊙ (x_t − x_{t+1})``, so ``Σ A ≈ f(x_0) − f(x_T)`` (the sum rule,
exact to first order in the step). Variants of the paper / its public package:

* ``"smooth"`` (MFABA-SMOOTH, default): sign steps ``x_{t+1} = x_t − α·sign(∇f(x_t))``, kept within
  ``‖x_{t+1} − x_0‖_∞ ≤ ε`` and inside the valid pixel box [0, 1]; α = 0.001, ε = 0.3, T = 50 steps
  (the package's defaults, in [0, 1] pixel units).
* ``"sharp"`` (MFABA-SHARP): L2-normalised gradient steps of length 100·α = 0.1, pixel box only.

For CLIP, ``f`` = cos(embedding, other modality's clean embedding) rather than a class's softmax
probability, and there is no class decision to flip, so the paper's early stop (when the predicted class
changes) has no counterpart: the path runs all T steps, or stops per pair once ``f ≤ stop_at`` if given.

Image: the path runs in raw [0, 1] pixel space (preprocessing's ``Normalize`` undone; the attribution is the
same in either space, since ``∇`` and the step transform inversely), summed over colour channels to
``[B, H, W]``. Text: the path runs on the token-embedding rows ``[B, L, D]`` (no box), summed over channels
to ``[B, L]``; α and ε are rescaled to the same size in standard deviations: pixel step / mean pixel std
× the standard deviation of the token-embedding table. Each pair's path is its own (no batch coupling).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Literal, Optional, Union

import torch
from torch import Tensor

from clipib.attribution.base import Attributor, Scores
from clipib.attribution.common import ScoreFn, image_cosine, normalisation, text_cosine
from clipib.models.split import SplitCLIP

Variant = Literal["smooth", "sharp"]
Bound = Union[float, Tensor]


@dataclass
class BoundaryPath:
    """Result of :func:`mfaba`: the attribution (shape of ``x``) and each row's score at both path ends ``[B]``."""

    attribution: Tensor
    start: Tensor
    end: Tensor


@dataclass
class StepRule:
    """How :func:`mfaba` steps: ``variant``, step ``alpha``, L∞ bound ``eps`` and box ``[low, high]``.

    ``alpha``, ``eps``, ``low``, ``high`` are floats or tensors broadcastable to one row of ``x``; None = no bound.
    ``eps`` bounds the ``"smooth"`` variant only (the package's sharp path has no L∞ bound).
    """

    variant: Variant = "smooth"
    alpha: Bound = 0.001
    eps: Optional[Bound] = 0.3
    low: Optional[Bound] = None
    high: Optional[Bound] = None

    def next(self, x0: Tensor, x: Tensor, grad: Tensor) -> Tensor:
        """The point after ``x`` given ``∇f(x)``, projected onto the L∞ ball and the box."""
        if self.variant == "smooth":
            nxt = x - self.alpha * grad.sign()
        else:
            norm = grad.flatten(1).norm(dim=1).clamp_min(torch.finfo(grad.dtype).tiny)
            nxt = x - 100 * self.alpha * grad / norm.view(-1, *[1] * (grad.ndim - 1))
        if self.eps is not None and self.variant == "smooth":
            nxt = x0 + torch.maximum(torch.minimum(nxt - x0, _as(self.eps, x)), -_as(self.eps, x))
        if self.high is not None:
            nxt = torch.minimum(nxt, _as(self.high, x))
        if self.low is not None:
            nxt = torch.maximum(nxt, _as(self.low, x))
        return nxt


def _as(value: Bound, like: Tensor) -> Tensor:
    return torch.as_tensor(value, dtype=like.dtype, device=like.device)


def mfaba(score: ScoreFn, x: Tensor, rule: StepRule, steps: int, stop_at: Optional[float] = None) -> BoundaryPath:
    """MFABA attribution ``Σ_t ∇f(x_t) ⊙ (x_t − x_{t+1})`` along the boundary path of ``score`` from ``x``.

    Args:
        score: ``[B, ...] -> [B]``, row-wise independent.
        x: start points ``[B, ...]``.
        rule: the step rule.
        steps: most gradient steps T.
        stop_at: a row stops moving once its score is ``<= stop_at`` (None: never).
    """
    if steps < 1:
        raise ValueError("steps must be >= 1")
    x0 = x.detach()
    xt, total = x0.clone(), torch.zeros_like(x0)
    active = torch.ones(x0.shape[0], dtype=torch.bool, device=x0.device)
    start: Optional[Tensor] = None
    for _ in range(steps):
        xt.requires_grad_(True)
        s = score(xt)  # [B]
        (grad,) = torch.autograd.grad(s.sum(), xt)
        with torch.no_grad():
            start = s.detach() if start is None else start
            if stop_at is not None:
                active &= s > stop_at
            if not active.any():
                break
            nxt = torch.where(active.view(-1, *[1] * (x0.ndim - 1)), rule.next(x0, xt, grad), xt)
            total += grad * (xt - nxt)
        xt = nxt.detach()
    with torch.no_grad():
        end = score(xt)
    return BoundaryPath(total, start, end)


class MFABA(Attributor):
    """MFABA: first-order attribution along an adversarial path that lowers the pair's cosine.

    Args:
        clip: the model.
        variant: ``"smooth"`` (sign steps, default) or ``"sharp"`` (L2-normalised steps).
        steps: gradient steps T (50).
        alpha: step size in [0, 1] pixel units (0.001; sharp: step length 100·α).
        eps: L∞ bound of the smooth path in pixel units (0.3); None = unbounded.
        stop_at: stop a pair's path once its cosine is ``<= stop_at`` (None: run all steps).
        seed: unused (deterministic); kept for the common constructor.
    """

    name = "mfaba"

    def __init__(
        self,
        clip: SplitCLIP,
        variant: Variant = "smooth",
        steps: int = 50,
        alpha: float = 0.001,
        eps: Optional[float] = 0.3,
        stop_at: Optional[float] = None,
        seed: int = 0,
    ) -> None:
        super().__init__(clip, seed=seed)
        if variant not in ("smooth", "sharp"):
            raise ValueError(f"variant must be 'smooth' or 'sharp', got {variant!r}")
        if steps < 1 or alpha <= 0:
            raise ValueError("steps must be >= 1 and alpha > 0")
        self.variant, self.steps, self.alpha, self.eps, self.stop_at = variant, steps, alpha, eps, stop_at

    @staticmethod
    def _scalars(modality: str, path: BoundaryPath) -> Dict[str, Tensor]:
        return {f"{modality}_start": path.start, f"{modality}_end": path.end}

    def image_scores(self, images: Tensor, ids: Tensor, target: Tensor, generators: List[torch.Generator]) -> Scores:
        cos = image_cosine(self.clip, target)
        mean, std = normalisation(self.clip, images)  # [3, 1, 1] each
        rule = StepRule(self.variant, self.alpha, self.eps, low=0.0, high=1.0)
        path = mfaba(lambda p: cos((p - mean) / std), images * std + mean, rule, self.steps, self.stop_at)
        return path.attribution.sum(1), self._scalars("image", path)  # [B, H, W]

    def text_unit(self) -> float:
        """Text step per pixel step: std of the token-embedding table / mean pixel std (1 if unknown)."""
        pixel_std = float(normalisation(self.clip, torch.empty(0, dtype=torch.float64))[1].mean())
        return float(self.clip.text.token_embedding.weight.float().std()) / pixel_std

    def text_scores(self, images: Tensor, ids: Tensor, target: Tensor, generators: List[torch.Generator]) -> Scores:
        text = text_cosine(self.clip, ids, target)
        unit = self.text_unit()
        rule = StepRule(self.variant, self.alpha * unit, None if self.eps is None else self.eps * unit)
        path = mfaba(text.score, text.embeddings, rule, self.steps, self.stop_at)
        return path.attribution.sum(-1), self._scalars("text", path)  # [B, L]
