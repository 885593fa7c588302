"""NIB: Narrowing Information Bottleneck attribution (Zhu et al., ICLR 2025), as its reference code computes it.

Despite the information-theoretic derivation (eqs. 3-10), the computation is integrated gradients on a hidden
state with a zero baseline (REFERENCE_NOTES §2): with ``h`` the residual stream after ``layer`` blocks
(clipib ``layer=9`` = the input of 0-based block 9 of 12) and ``f`` the rest of the tower,
``A_t = Σ_i w_i · h_t · ∇_z cos(f(z), e_other)|_{z = λ_i h}``, summed over channels, signed.
The paper's path is the right Riemann sum ``λ_i = i/m``, ``w_i = 1/m``, m = 10 (``path="riemann"``).

Completeness (``Σ_t A_t = cos(f(h)) − cos(f(0))``) holds only in the limit, and slowly: the zero baseline
sits at LayerNorm's singular point, so ``cos(f(λh))`` moves steeply only for λ ≲ 1e-2, where a 10-point
uniform grid never looks. ``path="log"`` is a trapezoid rule on ``{0} ∪ logspace(log_min, 0, steps − 1)``
which is complete to a few decimals (in float64); it is an option, not the paper's setting.
See ``docs/methods.md`` for the measured gap.

Image map: drop CLS, patch grid, bilinear, min-max. Text map: SOT..EOT, min-max. Raw scores keep their sign.
Unlike the reference's batched path, there is no 1/batch-size factor: a pair's scores do not depend on its
batch. Deterministic (no noise).
"""

from __future__ import annotations

from typing import List, Literal, Optional, Tuple

import torch
from torch import Tensor

from clipib.attribution.base import Attributor, Scores
from clipib.attribution.compiled import CompiledPasses, check_compile
from clipib.attribution.precision import check_precision
from clipib.models.split import SplitCLIP, Tower


def riemann_path(steps: int) -> Tuple[Tensor, Tensor]:
    """``(λ, w)`` of the right Riemann sum on [0, 1]: ``λ_i = i/m``, ``w_i = 1/m``, i = 1..m."""
    lam = torch.arange(1, steps + 1, dtype=torch.float64) / steps
    return lam, torch.full_like(lam, 1.0 / steps)


def log_trapezoid_path(steps: int, log_min: float = -9.0) -> Tuple[Tensor, Tensor]:
    """``(λ, w)`` of the trapezoid rule on ``{0} ∪ logspace(log_min, 0, steps − 1)``."""
    if steps < 3:
        raise ValueError("the log path needs steps >= 3")
    lam = torch.cat([torch.zeros(1, dtype=torch.float64), torch.logspace(log_min, 0, steps - 1, dtype=torch.float64)])
    gaps = lam[1:] - lam[:-1]
    w = torch.zeros_like(lam)
    w[:-1] += gaps / 2
    w[1:] += gaps / 2
    return lam, w


def _cosine_rows(tower: Tower, k: int, pooled_only: bool, z: Tensor, x: Tensor, target: Tensor) -> Tensor:
    """``cos(f(z), target)`` per row ``[r]``: the suffix pass NIB differentiates (what ``compile=True`` compiles)."""
    return (tower.suffix(z, k, x, pooled_only=pooled_only) * target).sum(-1)


class NIB(Attributor):
    """Integrated gradients of ``cos(f(λh), e_other)`` over the narrowing scalar λ ∈ (0, 1] on a hidden state.

    Args:
        clip: the model.
        layer: where ``h`` is read (residual stream after ``layer`` blocks); None = the paper's 9 of 12,
            scaled to each tower's depth.
        steps: number of λ points m (paper: 10).
        path: ``"riemann"`` (paper: λ = i/m) or ``"log"`` (trapezoid on a log-spaced grid, complete).
        internal_batch_size: most rows (pairs × λ points) per suffix pass; None = all in one pass.
        log_min: log10 of the smallest non-zero λ of the log path.
        precision: ``"fp32"`` (default), ``"tf32"`` or ``"bf16"`` (:mod:`clipib.attribution.precision`).
        pooled_last_block: run the last block at the pooled row only (default; the same embedding up to float
            rounding, fewer FLOPs: the rows the head never reads are skipped). False = the full last block.
        compile: run the suffix passes through ``torch.compile`` with static shapes (off by default;
            :mod:`clipib.attribution.compiled`; equal to eager up to float rounding).
    """

    name = "nib"

    PAPER_LAYER, PAPER_DEPTH = 9, 12

    def __init__(
        self,
        clip: SplitCLIP,
        layer: Optional[int] = None,
        steps: int = 10,
        path: Literal["riemann", "log"] = "riemann",
        internal_batch_size: Optional[int] = None,
        log_min: float = -9.0,
        seed: int = 0,
        precision: str = "fp32",
        pooled_last_block: bool = True,
        compile: bool = False,
    ) -> None:
        super().__init__(clip, seed=seed, layer=layer)
        self.precision = check_precision(precision)
        self.pooled_last_block = pooled_last_block
        if compile:
            check_compile(clip.device)
        self.compile = compile
        self._compiled = CompiledPasses(_cosine_rows)
        if path not in ("riemann", "log"):
            raise ValueError(f"path must be 'riemann' or 'log', got {path!r}")
        if steps < 1:
            raise ValueError("steps must be >= 1")
        self.steps, self.path, self.log_min = steps, path, log_min
        self.internal_batch_size = internal_batch_size

    def lambdas(self) -> Tuple[Tensor, Tensor]:
        """``(λ, w)`` of the configured path, float64."""
        return riemann_path(self.steps) if self.path == "riemann" else log_trapezoid_path(self.steps, self.log_min)

    def scores(self, tower: Tower, x: Tensor, target: Tensor) -> Tensor:
        """Raw NIB scores ``[B, T]`` on ``tower`` for inputs ``x`` explained against ``target`` ``[B, E]``."""
        k = self.layer_for(tower)
        with torch.no_grad():
            h = tower.prefix(x, k)  # [B, T, D]
        lam, w = (v.to(h.device, h.dtype) for v in self.lambdas())
        b, m = h.shape[0], lam.shape[0]
        rows = b * m
        chunk = self.internal_batch_size or rows
        xs, tg = x.repeat_interleave(m, 0), target.repeat_interleave(m, 0)
        lam_rows, w_rows = lam.repeat(b), w.repeat(b)  # row r = pair r // m, point r % m
        grad_sum = torch.zeros_like(h)
        for start in range(0, rows, chunk):
            sl = slice(start, min(start + chunk, rows))
            pair = torch.arange(sl.start, sl.stop, device=h.device) // m
            z = (lam_rows[sl, None, None] * h[pair]).requires_grad_(True)  # [r, T, D]
            static = (tower, k, self.pooled_last_block)
            args = (z, xs[sl], tg[sl])
            cos = self._compiled(static, *args) if self.compile else _cosine_rows(*static, *args)  # [r]
            (g,) = torch.autograd.grad(cos.sum(), z)
            grad_sum.index_add_(0, pair, g * w_rows[sl, None, None])
        return (h * grad_sum).sum(-1)  # [B, T]

    def image_scores(self, images: Tensor, ids: Tensor, target: Tensor, generators: List[torch.Generator]) -> Scores:
        return self.clip.image.to_grid(self.scores(self.clip.image, images, target)), {}  # prefix tokens dropped

    def text_scores(self, images: Tensor, ids: Tensor, target: Tensor, generators: List[torch.Generator]) -> Scores:
        return self.scores(self.clip.text, ids, target), {}
