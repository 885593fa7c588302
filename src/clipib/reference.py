"""Reference-shaped loops: M2IB and NIB computed the way the official code is shaped (REFERENCE_NOTES §1-2).

One pair at a time, the global RNG after ``torch.manual_seed(seed)``, the whole open_clip model (both towers)
run at every step, the bottleneck inserted with a forward hook on open_clip's own blocks, model weights still
requiring gradients. Written independently of :mod:`clipib.attribution` (it uses open_clip's ``encode_image``
/ ``encode_text``, not :class:`~clipib.models.split.SplitCLIP`), so tests can check clipib's fast, batched
methods against it, and ``benchmarks/throughput.py`` can time it as the baseline.
"""

from __future__ import annotations

import contextlib
from typing import Callable, Iterator, Tuple

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


def _site(model: nn.Module, tower: str, layer: int) -> nn.Module:
    """The module whose output is the residual stream after ``layer`` blocks."""
    if tower == "image":
        return model.visual.transformer.resblocks[layer - 1] if layer > 0 else model.visual.ln_pre
    if layer == 0:
        raise ValueError("the reference text loop needs layer >= 1")
    return model.transformer.resblocks[layer - 1]


def _encode(model: nn.Module, tower: str, x: Tensor) -> Tensor:
    enc = model.encode_image if tower == "image" else model.encode_text
    return F.normalize(enc(x), dim=-1)


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
    x, other = (image, "text") if tower == "image" else (ids, "image")
    captured = {}
    with torch.no_grad(), _replace_output(site, lambda out: captured.setdefault("h", out)):
        _encode(model, tower, x)
    h = captured["h"][0].detach()  # [T_all, D]
    n = h.shape[0] if tower == "image" else int(ids[0].argmax()) + 1
    alpha = torch.full((n, h.shape[1]), 5.0, requires_grad=True)
    opt = torch.optim.Adam([alpha], lr=lr)
    for _ in range(steps):
        eps = torch.randn(copies, n, h.shape[1])
        lam = torch.sigmoid(alpha)

        def bottleneck(out: Tensor) -> Tensor:
            return torch.cat([lam * out[:, :n] + (1 - lam) * eps, out[:, n:]], dim=1)

        with _replace_output(site, bottleneck):
            emb = _encode(model, tower, x.repeat(copies, *[1] * (x.ndim - 1)))
        target = _encode(model, other, image if other == "image" else ids)  # recomputed every step
        kl = _kl(alpha, h[:n])
        loss = beta * kl.mean() - (emb @ target[0]).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    return kl.detach().sum(-1)


def m2ib_pair(model: nn.Module, image: Tensor, ids: Tensor, layer: int, seed: int, **kw) -> Tuple[Tensor, Tensor]:
    """``(image capacity [T], text capacity [L])`` of one pair after ``torch.manual_seed(seed)``, image first."""
    torch.manual_seed(seed)
    return m2ib_map(model, "image", image, ids, layer, **kw), m2ib_map(model, "text", image, ids, layer, **kw)


def nib_map(model: nn.Module, tower: str, image: Tensor, ids: Tensor, layer: int, steps: int = 10) -> Tensor:
    """NIB raw scores ``[T]`` of one pair: one batch-1 pass with a backward per λ = i/m (this loop re-runs the
    prefix blocks too, their output replaced by the hook; the reference caches the prefix)."""
    site = _site(model, tower, layer)
    x, other = (image, "text") if tower == "image" else (ids, "image")
    captured = {}
    with torch.no_grad():
        with _replace_output(site, lambda out: captured.setdefault("h", out)):
            _encode(model, tower, x)
        target = _encode(model, other, image if other == "image" else ids)
    h = captured["h"].detach()  # [1, T, D]
    total = torch.zeros_like(h)
    for i in range(1, steps + 1):
        z = (i / steps * h).requires_grad_(True)
        with _replace_output(site, lambda out: z):
            cos = (_encode(model, tower, x) @ target[0]).sum()
        (g,) = torch.autograd.grad(cos, z)
        total += g / steps
    return (h * total).sum(-1)[0]
