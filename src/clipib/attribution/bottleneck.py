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

Speed options (named; default results are the reference's up to float rounding):
``noise="device"`` draws the same shapes from one generator per pair on the model's device, seeded from one
draw of the pair's CPU generator: per-sample and batch-invariant, but a different stream from the official
one (it agrees with it as two seeds agree), and no host-to-device copy per step.
``internal_batch_size`` bounds the rows (pairs × copies) of one suffix pass: the objective is evaluated on
the whole batch from a graph-free forward, then each chunk is re-run for its gradient (about 1.5× the
compute of one unchunked pass, memory of one chunk).
``pooled_last_block`` (on by default) evaluates the tower's last block at the pooled row only
(``Tower.suffix(..., pooled_only=True)``): exact up to float rounding (the head reads no other row), ~40 %
fewer suffix FLOPs at M2IB's layer on ViT-B/32; ``False`` runs the full last block.
``compile`` (off by default) runs each step's forward (``z``, the suffix, the KL) — or, chunked, each suffix
pass — through ``torch.compile`` with static shapes (:mod:`clipib.attribution.compiled`); equal to eager up
to float rounding.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from clipib.attribution.compiled import CompiledPasses, check_compile
from clipib.models.split import Tower, fit_rows

NOISE_STREAMS = ("official", "device")
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


def draw_noise(
    generators: List[torch.Generator], copies: int, lengths: List[int], shape: tuple,
    device: Optional[torch.device] = None,
) -> Tensor:
    """``[B, C, T, D]`` float32 standard normals, pair ``i`` drawing ``[C, lengths[i], D]`` from its own
    generator (on the CPU by default, as the official code draws them; on ``device`` with generators living
    there); positions past ``lengths[i]`` are 0."""
    b, t, d = shape
    eps = torch.zeros(b, copies, t, d, device=device)
    for i, (g, n) in enumerate(zip(generators, lengths)):
        eps[i, :, :n] = torch.randn(copies, n, d, generator=g, device=device)
    return eps


def device_generators(generators: List[torch.Generator], device: torch.device) -> List[torch.Generator]:
    """One generator on ``device`` per pair, seeded with one 62-bit draw from the pair's CPU generator (so a
    pair's stream depends on its seed and on what it drew before, never on its batch)."""
    seeds = [int(torch.randint(0, 2**62, (1,), generator=g)) for g in generators]
    return [torch.Generator(device=device).manual_seed(s) for s in seeds]


def step_forward(tower: Tower, k: int, pooled_only: bool, alpha: Tensor, h: Tensor, eps: Tensor, xs: Tensor,
                 weights: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
    """One bottleneck step's forward: ``(emb [B, C, E], kl_el [B, T, D], kl [B])`` for ``α`` ``[B, T, D]`` on
    ``h`` ``[B, T, D]`` with noise ``eps`` ``[B, C, T, D]`` (what ``compile=True`` compiles)."""
    b, c = eps.shape[:2]
    z = torch.sigmoid(alpha)[:, None] * h[:, None] + torch.sigmoid(-alpha)[:, None] * eps  # [B, C, T, D]
    emb = tower.suffix(z.flatten(0, 1), k, xs, pooled_only=pooled_only).view(b, c, -1)  # [B, C, E]
    kl_el = kl_elementwise(alpha, h)  # [B, T, D]
    kl = (kl_el.mean(-1) * weights).sum(-1)  # [B]
    return emb, kl_el, kl


def _suffix_pass(tower: Tower, k: int, pooled_only: bool, z: Tensor, x: Tensor) -> Tensor:
    return tower.suffix(z, k, x, pooled_only=pooled_only)


def _clip_per_sample(grad: Tensor, max_norm: float) -> Tensor:
    """Scale each pair's gradient ``[B, ...]`` to norm ≤ ``max_norm`` (torch's clip_grad_norm_ rule, per pair)."""
    norms = grad.flatten(1).norm(dim=1).view(-1, *[1] * (grad.ndim - 1))
    return grad * (max_norm / (norms + 1e-6)).clamp(max=1.0)


@dataclass
class Bottleneck:
    """Settings of the optimisation (defaults: M2IB's reference code).

    ``noise`` (``"official"`` | ``"device"``), ``internal_batch_size`` (most rows per suffix pass, None =
    all), ``pooled_last_block`` and ``compile`` are speed options described in the module docstring.
    """

    steps: int = 10
    lr: float = 1.0
    copies: int = 10
    alpha_init: float = 5.0
    clip_grad: Optional[float] = None
    noise: str = "official"
    internal_batch_size: Optional[int] = None
    pooled_last_block: bool = True
    compile: bool = False
    _step: CompiledPasses = field(default_factory=lambda: CompiledPasses(step_forward), repr=False, compare=False)
    _pass: CompiledPasses = field(default_factory=lambda: CompiledPasses(_suffix_pass), repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.noise not in NOISE_STREAMS:
            raise ValueError(f"noise must be one of {NOISE_STREAMS}, got {self.noise!r}")
        if self.internal_batch_size is not None and self.internal_batch_size < 1:
            raise ValueError("internal_batch_size must be >= 1 or None")

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
        if self.compile:
            check_compile(x.device)
        with torch.no_grad():
            h = tower.prefix(x, k)  # [B, T, D]
        b, t, d = h.shape
        valid = torch.ones(b, t, dtype=torch.bool, device=h.device) if valid is None else fit_rows(valid, t)
        lengths = valid.sum(1).tolist()
        weights = valid.to(h.dtype) / valid.sum(1, keepdim=True)  # [B, T], mean over valid tokens
        alpha = torch.full_like(h, self.alpha_init, requires_grad=True)
        opt = torch.optim.Adam([alpha], lr=self.lr)
        xs = x.repeat_interleave(self.copies, 0)
        on_device = self.noise == "device"
        gens = device_generators(generators, h.device) if on_device else generators
        chunked = self.internal_batch_size is not None and self.internal_batch_size < b * self.copies
        for step in range(self.steps):
            eps = draw_noise(gens, self.copies, lengths, (b, t, d), h.device if on_device else None).to(h)
            last = step == self.steps - 1
            if chunked:
                emb, kl_el, kl, loss, grad = self._chunked_step(tower, h, alpha, eps, k, xs, target, objective,
                                                                weights, last)
            else:
                static = (tower, k, self.pooled_last_block)
                if self.compile:
                    emb, kl_el, kl = self._step(static, alpha, h, eps, xs, weights)
                else:
                    emb, kl_el, kl = step_forward(*static, alpha, h, eps, xs, weights)
                loss = objective(emb, target, kl)  # [B]
                if not last:
                    (grad,) = torch.autograd.grad(loss.sum(), alpha)
            if last:
                break  # the map is read from this forward pass; a last update would not change it
            opt.zero_grad(set_to_none=True)
            alpha.grad = grad if self.clip_grad is None else _clip_per_sample(grad, self.clip_grad)
            opt.step()
        fit = (emb * target[:, None]).sum(-1).mean(1)
        capacity = kl_el.detach().sum(-1).masked_fill(~valid, 0)
        return BottleneckResult(capacity=capacity, kl=kl.detach(), fit=fit.detach(), loss=loss.detach(),
                                alpha=alpha.detach())

    def _suffix(self, tower: Tower, z: Tensor, k: int, x: Tensor) -> Tensor:
        static = (tower, k, self.pooled_last_block)
        return self._pass(static, z, x) if self.compile else _suffix_pass(*static, z, x)

    def _chunked_step(
        self, tower: Tower, h: Tensor, alpha: Tensor, eps: Tensor, k: int, xs: Tensor, target: Tensor,
        objective: Objective, weights: Tensor, last: bool,
    ) -> Tuple[Tensor, Tensor, Tensor, Tensor, Optional[Tensor]]:
        """One step with at most ``internal_batch_size`` rows per suffix pass: ``(emb, kl_el, kl, loss, grad)``.

        The objective sees the whole batch once (as unchunked); its gradient reaches α through the KL
        directly and through ``z`` by re-running each chunk with a graph (one chunk's activations at a time).
        """
        b, c = h.shape[0], self.copies
        chunk = self.internal_batch_size
        z = torch.sigmoid(alpha)[:, None] * h[:, None] + torch.sigmoid(-alpha)[:, None] * eps  # [B, C, T, D]
        rows = z.detach().flatten(0, 1)  # [B·C, T, D]
        slices = [slice(s, min(s + chunk, b * c)) for s in range(0, b * c, chunk)]
        with torch.no_grad():
            emb = torch.cat([self._suffix(tower, rows[sl], k, xs[sl]) for sl in slices]).view(b, c, -1)  # [B, C, E]
        emb.requires_grad_(not last)
        kl_el = kl_elementwise(alpha, h)  # [B, T, D]
        kl = (kl_el.mean(-1) * weights).sum(-1)  # [B]
        loss = objective(emb, target, kl)  # [B]
        if last:
            return emb, kl_el, kl, loss, None
        g_alpha, g_emb = torch.autograd.grad(loss.sum(), [alpha, emb], allow_unused=True)
        g_emb = g_emb.flatten(0, 1) if g_emb is not None else torch.zeros_like(emb).flatten(0, 1)
        g_rows = torch.empty_like(rows)
        for sl in slices:
            piece = rows[sl].detach().requires_grad_(True)
            (g_rows[sl],) = torch.autograd.grad(self._suffix(tower, piece, k, xs[sl]), piece, grad_outputs=g_emb[sl])
        (g_z,) = torch.autograd.grad(z, alpha, grad_outputs=g_rows.view_as(z))
        grad = g_z if g_alpha is None else g_alpha + g_z
        return emb.detach(), kl_el, kl, loss, grad
