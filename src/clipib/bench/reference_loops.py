"""Reference-shaped loops: M2IB and NIB computed the way the official code is shaped (REFERENCE_NOTES §1-2).

One pair at a time, the global RNG after ``torch.manual_seed(seed)``, the bottleneck inserted with a forward
hook on open_clip's own blocks; whatever the model's weights require (the official code leaves them requiring
gradients, see :func:`weights_requiring_grad`) is back-propagated too.

- M2IB: every step runs the **whole two-tower model** on the ``copies`` duplicates: the attributed tower with
  the bottleneck, the other tower clean but inside the graph, then ``loss.backward()``.
- NIB: the prefix once (full forward with a capturing hook), then one batch-1 suffix pass with a
  ``backward()`` per λ = i/m.

Captions are fed without padding (SOT..EOT only), as the official code feeds one caption. Written
independently of :mod:`clipib.attribution` and :class:`~clipib.models.split.SplitCLIP` (it calls open_clip's
modules directly), so tests check clipib's fast, batched methods against it, and
:mod:`clipib.bench.throughput` times it as the baseline. :data:`REFERENCE_LOOPS` says, per method name, how
to run a loop with a clipib method's settings and what its FLOP floor is.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any, Callable, Dict, Iterator, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn


@contextlib.contextmanager
def _replace_output(module: nn.Module, fn: Callable[[Tensor], Tensor]) -> Iterator[None]:
    handle = module.register_forward_hook(lambda mod, args, out: fn(out))
    try:
        yield
    finally:
        handle.remove()


@contextlib.contextmanager
def weights_requiring_grad(model: nn.Module) -> Iterator[nn.Module]:
    """Let every weight of ``model`` require gradients (as in the official code), then restore and drop grads."""
    before = [p.requires_grad for p in model.parameters()]
    model.requires_grad_(True)
    try:
        yield model
    finally:
        for p, flag in zip(model.parameters(), before):
            p.requires_grad_(flag)
            p.grad = None


@contextlib.contextmanager
def loop_weights(model: nn.Module, weight_grads: bool = True) -> Iterator[nn.Module]:
    """``model`` for a reference loop: weights requiring gradients (:func:`weights_requiring_grad`, the cost
    REFERENCE_NOTES describes) or as loaded (clipib freezes them: the backward stops at the attributed site)."""
    if weight_grads:
        with weights_requiring_grad(model) as m:
            yield m
    else:
        yield model


def _site(model: nn.Module, tower: str, layer: int) -> nn.Module:
    """The module whose output is the residual stream after ``layer`` blocks."""
    if tower == "image":
        return model.visual.transformer.resblocks[layer - 1] if layer > 0 else model.visual.ln_pre
    if layer == 0:
        raise ValueError("the reference text loop needs layer >= 1")
    return model.transformer.resblocks[layer - 1]


def _project_text(model: nn.Module, x: Tensor, ids: Tensor) -> Tensor:
    """ln_final, pooling at the EOT (argmax id) and the text projection, L2-normalised."""
    x = model.ln_final(x)
    pooled = x[torch.arange(x.shape[0], device=x.device), ids.argmax(dim=-1)]
    proj = model.text_projection
    pooled = proj(pooled) if isinstance(proj, nn.Linear) else pooled @ proj
    return F.normalize(pooled, dim=-1)


def _encode_text(model: nn.Module, ids: Tensor) -> Tensor:
    """open_clip's text forward on unpadded ids ``[B, n]`` (positions and causal mask cut to ``n``)."""
    n = ids.shape[1]
    x = model.token_embedding(ids) + model.positional_embedding[:n]
    x = model.transformer(x, attn_mask=model.attn_mask[:n, :n])
    return _project_text(model, x, ids)


def _encode(model: nn.Module, tower: str, x: Tensor) -> Tensor:
    return F.normalize(model.encode_image(x), dim=-1) if tower == "image" else _encode_text(model, x)


def _suffix(model: nn.Module, tower: str, z: Tensor, layer: int, ids: Tensor) -> Tensor:
    """The blocks after ``layer`` and the head of ``tower`` on ``z`` ``[B, T, D]``, by open_clip's modules."""
    if tower == "image":
        visual = model.visual
        for block in visual.transformer.resblocks[layer:]:
            z = block(z)
        pooled, _ = visual._pool(z)
        return F.normalize(pooled @ visual.proj, dim=-1)
    n = z.shape[1]
    for block in model.transformer.resblocks[layer:]:
        z = block(z, attn_mask=model.attn_mask[:n, :n])
    return _project_text(model, z, ids)


def _inputs(tower: str, image: Tensor, ids: Tensor) -> Tuple[Tensor, Tensor, str]:
    """``(attributed input, other input, other tower)`` with the caption cut to SOT..EOT."""
    ids = ids[:, : int(ids[0].argmax()) + 1]
    return (image, ids, "text") if tower == "image" else (ids, image, "image")


def _kl(alpha: Tensor, h: Tensor) -> Tensor:
    lam = torch.sigmoid(alpha)
    return -0.5 * (1 + torch.log((1 - lam) ** 2) - (lam * h) ** 2 - (1 - lam) ** 2)


def m2ib_map(
    model: nn.Module, tower: str, image: Tensor, ids: Tensor, layer: int,
    beta: float = 0.1, steps: int = 10, lr: float = 1.0, copies: int = 10,
) -> Tensor:
    """Capacity per token ``[T]`` (summed over channels) of one pair's ``tower`` map, drawing its noise from
    the global RNG: ``[copies, T, D]`` per step, T = all image tokens or the caption's SOT..EOT length."""
    site = _site(model, tower, layer)
    x, y, other = _inputs(tower, image, ids)
    captured = {}
    with torch.no_grad(), _replace_output(site, lambda out: captured.setdefault("h", out)):
        _encode(model, tower, x)
    h = captured["h"][0].detach()  # [T, D]
    n, d = h.shape
    alpha = torch.full((n, d), 5.0, device=h.device, requires_grad=True)
    opt = torch.optim.Adam([alpha], lr=lr)
    xs, ys = (v.repeat(copies, *[1] * (v.ndim - 1)) for v in (x, y))
    for _ in range(steps):
        eps = torch.randn(copies, n, d).to(h.device)  # the global CPU stream
        lam = torch.sigmoid(alpha)
        with _replace_output(site, lambda out: lam * out + (1 - lam) * eps):
            emb = _encode(model, tower, xs)  # [C, E]
        target = _encode(model, other, ys)  # [C, E]: the other tower, clean, every step, in the graph
        kl = _kl(alpha, h)
        loss = beta * kl.mean() - (emb * target).sum(-1).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    return kl.detach().sum(-1)


def m2ib_pair(model: nn.Module, image: Tensor, ids: Tensor, layer: int, seed: int,
              **kw: Any) -> Tuple[Tensor, Tensor]:
    """``(image capacity [T], text capacity [L])`` of one pair after ``torch.manual_seed(seed)``, image first."""
    torch.manual_seed(seed)
    return m2ib_map(model, "image", image, ids, layer, **kw), m2ib_map(model, "text", image, ids, layer, **kw)


def nib_map(model: nn.Module, tower: str, image: Tensor, ids: Tensor, layer: int, steps: int = 10) -> Tensor:
    """NIB raw scores ``[T]`` of one pair: the prefix once, then one batch-1 suffix pass with a
    ``backward()`` per λ = i/m (T = all image tokens or the caption's SOT..EOT length)."""
    site = _site(model, tower, layer)
    x, y, other = _inputs(tower, image, ids)
    tok = x if tower == "text" else None
    captured = {}
    with torch.no_grad():
        with _replace_output(site, lambda out: captured.setdefault("h", out)):
            _encode(model, tower, x)
        target = _encode(model, other, y)  # [1, E]
    h = captured["h"].detach()  # [1, T, D]
    total = torch.zeros_like(h)
    for i in range(1, steps + 1):
        z = (i / steps * h).requires_grad_(True)
        cos = (_suffix(model, tower, z, layer, tok) * target).sum()
        cos.backward()
        total += z.grad / steps
    return (h * total).sum(-1)[0]


@dataclass(frozen=True)
class ReferenceLoop:
    """One method's reference-shaped loop, as the benchmark runs it next to the clipib method."""

    map: Callable[..., Tensor]
    """``(model, tower, image [1, 3, H, W], ids [1, ctx], layer, **settings) -> scores [T]`` of one pair."""
    settings: Callable[[Any], Dict[str, Any]]
    """The loop's keyword arguments (``steps`` among them), read off a clipib method object."""
    mismatch: Callable[[Any], Optional[str]]
    """Why a clipib method's settings are not what the loop computes (None: they are)."""
    floor: Callable[[Dict[str, Any], Dict[str, int]], int]
    """FLOPs per map the method cannot avoid, from :attr:`settings` and one suffix row's ``{"fwd", "bwd"}``."""
    rows: Callable[[Dict[str, Any]], int]
    """Rows of one pair's batched suffix pass in clipib (M2IB's copies, NIB's λ points)."""
    stochastic: bool
    """Draws its noise from the global RNG: compared with clipib by ρ next to its own seed-to-seed ρ (else by
    the largest difference of the normalised maps)."""
    extrapolate_from: Optional[Tuple[int, int]] = None
    """Count FLOPs at ``(clipib, reference)`` steps ``a`` and ``a + 1`` and extrapolate linearly (None: count
    the full run)."""


def _m2ib_mismatch(method: Any) -> Optional[str]:
    b = method.bottleneck
    if b.alpha_init != 5.0 or b.clip_grad is not None or b.noise != "official" or method.precision != "fp32":
        return "the M2IB reference loop has α₀ = 5, no clipping, the official noise and fp32"
    return None


def _nib_mismatch(method: Any) -> Optional[str]:
    if method.path != "riemann" or method.precision != "fp32":
        return "the NIB reference loop is the paper's Riemann path in fp32"
    return None


REFERENCE_LOOPS: Dict[str, ReferenceLoop] = {
    "m2ib": ReferenceLoop(
        map=m2ib_map,
        settings=lambda m: dict(beta=m.beta, steps=m.bottleneck.steps, lr=m.bottleneck.lr, copies=m.bottleneck.copies),
        mismatch=_m2ib_mismatch,
        # every step a forward of each copy, every step but the last a backward to the bottleneck input
        floor=lambda s, f: s["copies"] * (s["steps"] * f["fwd"] + (s["steps"] - 1) * f["bwd"]),
        rows=lambda s: s["copies"], stochastic=True, extrapolate_from=(2, 1)),
    "nib": ReferenceLoop(
        map=nib_map, settings=lambda m: dict(steps=m.steps), mismatch=_nib_mismatch,
        floor=lambda s, f: s["steps"] * (f["fwd"] + f["bwd"]),  # one forward and one backward per λ point
        rows=lambda s: s["steps"], stochastic=False),
}
"""Method name -> its reference-shaped loop; the methods :mod:`clipib.bench.throughput` compares with one."""
