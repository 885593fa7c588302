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

Paper options (defaults leave the reference's computation untouched):
``sigma`` is M2IB's σ (eq. 4-5, App. A grid over σ²): the posterior is ``N(λh, σ²(1−λ)²)``, i.e.
``z = λh + σ(1−λ)ε``, against the prior ``N(0, 1)``; its KL gains ``−log σ²`` and ``σ²`` where σ = 1 has 0 and 1.
``stats`` (``(mean [D], std [D])``, :mod:`clipib.attribution.feature_stats`) is IBA's normalisation (Schulz et
al. 2020): the bottleneck acts on ``h̃ = (h − μ)/s``, ``z = s·(λh̃ + σ(1−λ)ε) + μ = λh + (1−λ)(μ + sσε)`` — the
noise follows the feature distribution — and the KL is taken on ``h̃``.
``extra_params``: per-pair tensors ``[B, ...]`` (e.g. AdaIB's jointly trained g-MLP) optimised with α by the
same Adam, the same loss and the same per-pair global gradient-norm clip.
Every run records, per pair, the L2 norm of the gradient the update sees **before** clipping (α's, plus the
extra parameters' when given): its mean and max over the ``steps − 1`` updates and the fraction of updates the
clip scaled down (``BottleneckResult.grad_norm_mean`` / ``grad_norm_max`` / ``clipped``; 0 with one step).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from clipib.models.split import Tower

NOISE_STREAMS = ("official", "device")
Objective = Callable[..., Tensor]
"""``objective(emb [B, C, E], target [B, E], kl [B]) -> loss [B]`` (minimised); with ``Bottleneck.run(...,
raw=True)`` it is also given ``raw=`` the embeddings ``[B, C, E]`` before their L2 normalisation (detached)."""


@dataclass
class BottleneckResult:
    """Outcome of one bottleneck optimisation.

    Attributes:
        capacity: ``[B, T]`` KL of the last forward pass summed over channels (nats); 0 on invalid tokens.
        kl: ``[B]`` the compression term of the last forward pass.
        fit: ``[B]`` mean cosine over the copies in the last forward pass.
        loss: ``[B]`` the objective of the last forward pass.
        alpha: ``[B, T, D]`` the α of the last forward pass.
        grad_norm_mean, grad_norm_max: ``[B]`` mean and max over the updates of the pre-clip gradient norm.
        clipped: ``[B]`` fraction of the updates whose gradient the clip scaled down (0 without a clip).
    """

    capacity: Tensor
    kl: Tensor
    fit: Tensor
    loss: Tensor
    alpha: Tensor
    grad_norm_mean: Optional[Tensor] = None
    grad_norm_max: Optional[Tensor] = None
    clipped: Optional[Tensor] = None


def kl_elementwise(alpha: Tensor, h: Tensor, sigma: float = 1.0) -> Tensor:
    """KL( N(λh, σ²(1−λ)²) ‖ N(0, 1) ) per element, λ = sigmoid(α), stable for any α (σ = 1: M2IB's reference)."""
    lam, one_minus = torch.sigmoid(alpha), torch.sigmoid(-alpha)
    if sigma == 1.0:
        return -0.5 * (1 + 2 * F.logsigmoid(-alpha) - (lam * h) ** 2 - one_minus**2)
    return -0.5 * (1 + 2 * math.log(sigma) + 2 * F.logsigmoid(-alpha) - (lam * h) ** 2 - (sigma * one_minus) ** 2)


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


def _clip_per_sample(grad: Tensor, max_norm: float) -> Tensor:
    """Scale each pair's gradient ``[B, ...]`` to norm ≤ ``max_norm`` (torch's clip_grad_norm_ rule, per pair)."""
    norms = grad.flatten(1).norm(dim=1).view(-1, *[1] * (grad.ndim - 1))
    return grad * (max_norm / (norms + 1e-6)).clamp(max=1.0)


def pair_norms(grads: Sequence[Tensor]) -> Tensor:
    """``[B]``: each pair's L2 norm over all of ``grads`` (tensors ``[B, ...]``), the norm a global clip sees."""
    return torch.stack([g.reshape(g.shape[0], -1).norm(dim=1) for g in grads]).norm(dim=0)


def clip_pairs(grads: Sequence[Tensor], norms: Tensor, max_norm: float) -> List[Tensor]:
    """Scale each pair's slice of every tensor in ``grads`` by ``max_norm / (norm + 1e-6)`` where that is < 1
    (torch's ``clip_grad_norm_`` rule over all the pair's parameters together)."""
    scale = (max_norm / (norms + 1e-6)).clamp(max=1.0)
    return [g * scale.view(-1, *[1] * (g.ndim - 1)) for g in grads]


@dataclass
class _GradLog:
    """Pre-clip gradient norms ``[B]`` per update, summarised into the result's three fields."""

    norms: List[Tensor]
    clipped: List[Tensor]

    def add(self, norms: Tensor, max_norm: Optional[float]) -> None:
        self.norms.append(norms.detach())
        hit = (max_norm / (norms + 1e-6)) < 1.0 if max_norm is not None else torch.zeros_like(norms, dtype=torch.bool)
        self.clipped.append(hit.detach())

    def summary(self, b: int, like: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
        if not self.norms:
            zero = like.new_zeros(b)
            return zero, zero, zero
        norms = torch.stack(self.norms)  # [S-1, B]
        return norms.mean(0), norms.amax(0), torch.stack(self.clipped).to(norms.dtype).mean(0)


@dataclass
class Bottleneck:
    """Settings of the optimisation (defaults: M2IB's reference code).

    ``noise`` (``"official"`` | ``"device"``), ``internal_batch_size`` (most rows per suffix pass, None =
    all) and ``pooled_last_block`` are speed options described in the module docstring; ``sigma`` is M2IB's σ.
    """

    steps: int = 10
    lr: float = 1.0
    copies: int = 10
    alpha_init: float = 5.0
    clip_grad: Optional[float] = None
    noise: str = "official"
    internal_batch_size: Optional[int] = None
    pooled_last_block: bool = True
    sigma: float = 1.0

    def __post_init__(self) -> None:
        if self.noise not in NOISE_STREAMS:
            raise ValueError(f"noise must be one of {NOISE_STREAMS}, got {self.noise!r}")
        if not (isinstance(self.sigma, (int, float)) and math.isfinite(self.sigma) and self.sigma > 0):
            raise ValueError(f"sigma must be a finite number > 0, got {self.sigma!r}")
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
        stats: Optional[Tuple[Tensor, Tensor]] = None,
        extra_params: Sequence[Tensor] = (),
        raw: bool = False,
    ) -> BottleneckResult:
        """Optimise one bottleneck per pair at layer ``k`` of ``tower`` on inputs ``x``.

        Args:
            target: ``[B, E]`` clean normalised embedding of the other modality.
            valid: ``[B, T]`` bool, the tokens that count (default all); the KL is averaged over them.
            stats: IBA's per-channel feature ``(mean [D], std [D])`` (std already clamped), or None.
            extra_params: per-pair leaf tensors ``[B, ...]`` the objective reads, optimised with α.
            raw: also pass the objective the embeddings before their L2 normalisation (detached), as
                ``objective(emb, target, kl, raw=emb_raw)``.
        """
        if self.steps < 1:
            raise ValueError("steps must be >= 1")
        with torch.no_grad():
            h = tower.prefix(x, k)  # [B, T, D]
        h_kl, to_noise = self._feature_space(h, stats)
        b, t, d = h.shape
        valid = torch.ones(b, t, dtype=torch.bool, device=h.device) if valid is None else valid[:, :t]
        lengths = valid.sum(1).tolist()
        weights = valid.to(h.dtype) / valid.sum(1, keepdim=True)  # [B, T], mean over valid tokens
        alpha = torch.full_like(h, self.alpha_init, requires_grad=True)
        params = [alpha, *extra_params]
        opt = torch.optim.Adam(params, lr=self.lr)
        log = _GradLog([], [])
        xs = x.repeat_interleave(self.copies, 0)
        on_device = self.noise == "device"
        gens = device_generators(generators, h.device) if on_device else generators
        chunked = self.internal_batch_size is not None and self.internal_batch_size < b * self.copies
        for step in range(self.steps):
            eps = draw_noise(gens, self.copies, lengths, (b, t, d), h.device if on_device else None).to(h)
            eps = to_noise(eps)
            last = step == self.steps - 1
            if chunked:
                emb, kl_el, kl, loss, grads = self._chunked_step(tower, h, h_kl, alpha, eps, k, xs, target,
                                                                 objective, weights, last, extra_params, raw)
            else:
                z = torch.sigmoid(alpha)[:, None] * h[:, None] + torch.sigmoid(-alpha)[:, None] * eps
                emb = self._suffix(tower, z.flatten(0, 1), k, xs, normalize=not raw).view(b, self.copies, -1)
                kl_el = kl_elementwise(alpha, h_kl, self.sigma)  # [B, T, D]
                kl = (kl_el.mean(-1) * weights).sum(-1)  # [B]
                if raw:
                    emb_raw, emb = emb, F.normalize(emb, dim=-1)
                    loss = objective(emb, target, kl, raw=emb_raw.detach())
                else:
                    loss = objective(emb, target, kl)  # [B]
                if not last:
                    grads = list(torch.autograd.grad(loss.sum(), params))
            if last:
                break  # the map is read from this forward pass; a last update would not change it
            opt.zero_grad(set_to_none=True)
            self._set_grads(params, grads, log)
            opt.step()
        fit = (emb * target[:, None]).sum(-1).mean(1)
        capacity = kl_el.detach().sum(-1).masked_fill(~valid, 0)
        mean_norm, max_norm, clipped = log.summary(b, kl.detach())
        return BottleneckResult(capacity=capacity, kl=kl.detach(), fit=fit.detach(), loss=loss.detach(),
                                alpha=alpha.detach(), grad_norm_mean=mean_norm, grad_norm_max=max_norm,
                                clipped=clipped)

    def _set_grads(self, params: List[Tensor], grads: List[Tensor], log: _GradLog) -> None:
        """Record the pre-clip norms, clip per pair (all parameters together), set ``.grad``."""
        if len(params) == 1:  # α alone: the original path, bit for bit
            (grad,) = grads
            log.add(grad.flatten(1).norm(dim=1), self.clip_grad)
            params[0].grad = grad if self.clip_grad is None else _clip_per_sample(grad, self.clip_grad)
            return
        norms = pair_norms(grads)
        log.add(norms, self.clip_grad)
        if self.clip_grad is not None:
            grads = clip_pairs(grads, norms, self.clip_grad)
        for p, g in zip(params, grads):
            p.grad = g

    def _feature_space(
        self, h: Tensor, stats: Optional[Tuple[Tensor, Tensor]],
    ) -> Tuple[Tensor, Callable[[Tensor], Tensor]]:
        """``(h_kl, to_noise)``: the stream the KL reads and the map from N(0, I) draws ``[B, C, T, D]`` to the
        noise ``z`` mixes in (σ and IBA's feature statistics; the identity by default)."""
        if stats is None:
            if self.sigma == 1.0:
                return h, lambda eps: eps
            return h, lambda eps: self.sigma * eps
        mean, std = (s.to(h) for s in stats)
        if mean.shape != (h.shape[-1],) or std.shape != (h.shape[-1],):
            raise ValueError(f"feature statistics have {tuple(mean.shape)} channels, the layer has {h.shape[-1]}")
        return (h - mean) / std, lambda eps: mean + (std * self.sigma) * eps

    def _suffix(self, tower: Tower, z: Tensor, k: int, x: Tensor, normalize: bool = True) -> Tensor:
        if normalize:
            return tower.suffix(z, k, x, pooled_only=self.pooled_last_block)
        return tower.suffix(z, k, x, pooled_only=self.pooled_last_block, normalize=False)

    def _chunked_step(
        self, tower: Tower, h: Tensor, h_kl: Tensor, alpha: Tensor, eps: Tensor, k: int, xs: Tensor,
        target: Tensor, objective: Objective, weights: Tensor, last: bool, extra_params: Sequence[Tensor] = (),
        raw: bool = False,
    ) -> Tuple[Tensor, Tensor, Tensor, Tensor, Optional[List[Tensor]]]:
        """One step with at most ``internal_batch_size`` rows per suffix pass: ``(emb, kl_el, kl, loss, grads)``
        (``grads``: α's, then ``extra_params``'s).

        The objective sees the whole batch once (as unchunked); its gradient reaches α through the KL
        directly and through ``z`` by re-running each chunk with a graph (one chunk's activations at a time).
        """
        b, c = h.shape[0], self.copies
        chunk = self.internal_batch_size
        z = torch.sigmoid(alpha)[:, None] * h[:, None] + torch.sigmoid(-alpha)[:, None] * eps  # [B, C, T, D]
        rows = z.detach().flatten(0, 1)  # [B·C, T, D]
        slices = [slice(s, min(s + chunk, b * c)) for s in range(0, b * c, chunk)]
        with torch.no_grad():
            emb = torch.cat([self._suffix(tower, rows[sl], k, xs[sl], not raw) for sl in slices]).view(b, c, -1)
        emb_raw = None
        if raw:  # the gradient below re-runs the chunks normalised: the same function of z as F.normalize(raw)
            emb_raw, emb = emb, F.normalize(emb, dim=-1)
        emb.requires_grad_(not last)
        kl_el = kl_elementwise(alpha, h_kl, self.sigma)  # [B, T, D]
        kl = (kl_el.mean(-1) * weights).sum(-1)  # [B]
        loss = objective(emb, target, kl) if emb_raw is None else objective(emb, target, kl, raw=emb_raw)  # [B]
        if last:
            return emb, kl_el, kl, loss, None
        g_alpha, g_emb, *g_extra = torch.autograd.grad(loss.sum(), [alpha, emb, *extra_params], allow_unused=True)
        g_emb = g_emb.flatten(0, 1) if g_emb is not None else torch.zeros_like(emb).flatten(0, 1)
        g_rows = torch.empty_like(rows)
        for sl in slices:
            piece = rows[sl].detach().requires_grad_(True)
            (g_rows[sl],) = torch.autograd.grad(self._suffix(tower, piece, k, xs[sl]), piece, grad_outputs=g_emb[sl])
        (g_z,) = torch.autograd.grad(z, alpha, grad_outputs=g_rows.view_as(z))
        grad = g_z if g_alpha is None else g_alpha + g_z
        g_extra = [torch.zeros_like(p) if g is None else g for p, g in zip(extra_params, g_extra)]
        return emb.detach(), kl_el, kl, loss, [grad, *g_extra]
