"""The per-sample multimodal information bottleneck and its optimiser loop (M2IB, eqs. 4-15; reused by AdaIB).

On the residual stream ``h`` after ``k`` blocks of one tower (every token, every channel):
``z = λ⊙h + (1−λ)⊙ε``, ``λ = sigmoid(α)``, ``ε ~ N(0, I)``, one ``α`` per token and channel, initialised to 5.
The compression term is the closed-form KL of ``N(λh, (1−λ)²)`` against ``N(0, 1)`` averaged over the valid
tokens and all channels; the fit term is the cosine between the bottlenecked tower's embedding and the
other tower's clean embedding. ``α`` is optimised with Adam for ``steps`` steps, ``copies`` noise draws per
step; the map is the KL of the last forward pass (``α`` after ``steps − 1`` updates) summed over channels
(REFERENCE_NOTES §1).

Deviation guarded here: the reference computes ``log((1−λ)²)`` from ``1 − sigmoid(α)``, which is 0 in fp32
once ``α ≳ 16.6`` (inf/NaN KL, hidden by ``nansum``). clipib uses ``1−λ = sigmoid(−α)`` and
``log(1−λ) = logsigmoid(−α)``: identical wherever the reference is finite, finite everywhere.

Batching: ``B`` pairs are optimised together; the loss is the sum of per-pair losses and Adam is
element-wise, so each pair follows exactly the trajectory it would follow alone. Each pair draws its noise
from its own generator, ``[copies, T_i, D]`` per step with ``T_i`` its own valid length (the official stream).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, List, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from clipib.models.split import Tower

Objective = Callable[[Tensor, Tensor, Tensor], Tensor]
"""``objective(emb [B, C, E], target [B, E], kl [B]) -> loss [B]`` (minimised)."""


@dataclass
class BottleneckResult:
    """Outcome of one bottleneck optimisation.

    Attributes:
        capacity: ``[B, T]`` KL of the last forward pass summed over channels (nats); 0 on invalid tokens.
        kl: ``[B]`` the compression term of the last forward pass.
        fit: ``[B]`` mean cosine over the copies in the last forward pass.
        loss: ``[B]`` the objective of the last forward pass.
        alpha: ``[B, T, D]`` the α of the last forward pass.
    """

    capacity: Tensor
    kl: Tensor
    fit: Tensor
    loss: Tensor
    alpha: Tensor


def kl_elementwise(alpha: Tensor, h: Tensor) -> Tensor:
    """KL( N(λh, (1−λ)²) ‖ N(0, 1) ) per element, λ = sigmoid(α), stable for any α."""
    lam, one_minus = torch.sigmoid(alpha), torch.sigmoid(-alpha)
    return -0.5 * (1 + 2 * F.logsigmoid(-alpha) - (lam * h) ** 2 - one_minus**2)


def draw_noise(generators: List[torch.Generator], copies: int, lengths: List[int], shape: tuple) -> Tensor:
    """``[B, C, T, D]`` standard normals, pair ``i`` drawing ``[C, lengths[i], D]`` from its own generator
    (float32 on the CPU, as the official code draws them); positions past ``lengths[i]`` are 0."""
    b, t, d = shape
    eps = torch.zeros(b, copies, t, d)
    for i, (g, n) in enumerate(zip(generators, lengths)):
        eps[i, :, :n] = torch.randn(copies, n, d, generator=g)
    return eps


def _clip_per_sample(grad: Tensor, max_norm: float) -> Tensor:
    """Scale each pair's gradient ``[B, ...]`` to norm ≤ ``max_norm`` (torch's clip_grad_norm_ rule, per pair)."""
    norms = grad.flatten(1).norm(dim=1).view(-1, *[1] * (grad.ndim - 1))
    return grad * (max_norm / (norms + 1e-6)).clamp(max=1.0)


@dataclass
class Bottleneck:
    """Settings of the optimisation (defaults: M2IB's reference code)."""

    steps: int = 10
    lr: float = 1.0
    copies: int = 10
    alpha_init: float = 5.0
    clip_grad: Optional[float] = None

    def run(
        self,
        tower: Tower,
        x: Tensor,
        k: int,
        target: Tensor,
        generators: List[torch.Generator],
        objective: Objective,
        valid: Optional[Tensor] = None,
    ) -> BottleneckResult:
        """Optimise one bottleneck per pair at layer ``k`` of ``tower`` on inputs ``x``.

        Args:
            target: ``[B, E]`` clean normalised embedding of the other modality.
            valid: ``[B, T]`` bool, the tokens that count (default all); the KL is averaged over them.
        """
        if self.steps < 1:
            raise ValueError("steps must be >= 1")
        with torch.no_grad():
            h = tower.prefix(x, k)  # [B, T, D]
        b, t, d = h.shape
        valid = torch.ones(b, t, dtype=torch.bool, device=h.device) if valid is None else valid[:, :t]
        lengths = valid.sum(1).tolist()
        weights = valid.to(h.dtype) / valid.sum(1, keepdim=True)  # [B, T], mean over valid tokens
        alpha = torch.full_like(h, self.alpha_init, requires_grad=True)
        opt = torch.optim.Adam([alpha], lr=self.lr)
        xs = x.repeat_interleave(self.copies, 0)
        for step in range(self.steps):
            eps = draw_noise(generators, self.copies, lengths, (b, t, d)).to(h)  # [B, C, T, D]
            z = torch.sigmoid(alpha)[:, None] * h[:, None] + torch.sigmoid(-alpha)[:, None] * eps
            emb = tower.suffix(z.flatten(0, 1), k, xs).view(b, self.copies, -1)  # [B, C, E]
            kl_el = kl_elementwise(alpha, h)  # [B, T, D]
            kl = (kl_el.mean(-1) * weights).sum(-1)  # [B]
            loss = objective(emb, target, kl)  # [B]
            if step == self.steps - 1:
                break  # the map is read from this forward pass; a last update would not change it
            opt.zero_grad(set_to_none=True)
            (grad,) = torch.autograd.grad(loss.sum(), alpha)
            alpha.grad = grad if self.clip_grad is None else _clip_per_sample(grad, self.clip_grad)
            opt.step()
        fit = (emb * target[:, None]).sum(-1).mean(1)
        capacity = kl_el.detach().sum(-1).masked_fill(~valid, 0)
        return BottleneckResult(capacity=capacity, kl=kl.detach(), fit=fit.detach(), loss=loss.detach(),
                                alpha=alpha.detach())
