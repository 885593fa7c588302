"""The FLOP floor of M2IB and NIB and how close measured timings come to it (issue 7).

Floor per pair and map = the suffix passes the method cannot avoid, counted with
``torch.utils.flop_counter.FlopCounterMode`` (matmuls, attention, convolutions) on one row, with the last
block evaluated at the pooled row only (``Tower.suffix(..., pooled_only=True)``; the count with a full last
block is reported too):

- M2IB: ``copies × (steps × F_fwd + (steps − 1) × F_bwd)``: every step a forward of the suffix on each
  copy, every step but the last a backward to the bottleneck input (no weight gradients).
- NIB: ``m × (F_fwd + F_bwd)``: one forward and one input-gradient backward per λ point.

(``ReferenceLoop.floor`` in :data:`~clipib.bench.reference_loops.REFERENCE_LOOPS`.)

The time floor is that count divided by a measured matmul rate of this device on a suffix-shaped product
(``[R·T, D] @ [D, 4D]``, R = M2IB's copies or NIB's λ points: the rows of one pair's batched pass).
clipib's and the reference loop's own FLOPs are counted the same way (M2IB
extrapolated linearly from 2-3 steps, which is exact: every step has the same shape).
"""

from __future__ import annotations

import time
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch
from torch.utils.flop_counter import FlopCounterMode

from clipib.attribution import METHODS
from clipib.bench.common import synthetic_pairs
from clipib.bench.reference_loops import REFERENCE_LOOPS, loop_weights
from clipib.bench.timing import start_timer, stop_timer
from clipib.models.split import SplitCLIP, Tower


class _GlobalOnly:
    """Stands in for ``FlopCounterMode``'s module tracker, whose backward hooks reject ``autograd.grad`` on
    leaf tensors (what the methods call); every count goes to the global total."""

    parents = ("Global",)

    def __enter__(self) -> "_GlobalOnly":
        return self

    def __exit__(self, *args: Any) -> None:
        return None


def count_flops(fn: Callable[[], Any]) -> int:
    """FLOPs of ``fn()`` (forward and backward) as ``FlopCounterMode`` counts them (matmuls, attention,
    convolutions; element-wise work is not counted)."""
    counter = FlopCounterMode(display=False)
    counter.mod_tracker = _GlobalOnly()
    with counter:
        fn()
    return int(counter.get_total_flops())


def suffix_flops(tower: Tower, x: torch.Tensor, k: int, pooled_only: bool = True) -> Dict[str, int]:
    """``{"fwd", "bwd"}``: FLOPs of one suffix forward on one row (with autograd on, as the methods run it)
    and of its backward to the input; ``pooled_only``: the last block at the pooled row only (the floor)."""
    with torch.no_grad():
        h = tower.prefix(x[:1], k)  # [1, T, D]
    z = h.clone().requires_grad_(True)
    fwd = count_flops(lambda: tower.suffix(z, k, x[:1], pooled_only=pooled_only))
    both = count_flops(lambda: torch.autograd.grad(tower.suffix(z, k, x[:1], pooled_only=pooled_only).sum(), z))
    return {"fwd": fwd, "bwd": both - fwd}


def matmul_rate(device: torch.device, rows: int, width: int, seconds: float = 0.5) -> float:
    """Measured GFLOP/s of ``[rows, width] @ [width, 4·width]`` float32 products on ``device``."""
    a = torch.randn(rows, width, device=device)  # [rows, D]
    b = torch.randn(width, 4 * width, device=device)  # [D, 4D]
    a @ b  # warm-up
    n, start = 0, start_timer(device)
    while time.perf_counter() - start < seconds:
        a @ b
        n += 1
        if device.type == "cuda" and n % 50 == 0:
            torch.cuda.synchronize(device)
    elapsed, _ = stop_timer(device, start)
    return 2 * rows * width * 4 * width * n / elapsed / 1e9


def _count_steps(fn: Callable[[int], Any], steps: int, start: Optional[int]) -> int:
    """FLOPs of ``fn(steps)``: counted, or (``start``) from counts at ``start`` and ``start + 1`` steps,
    extrapolated linearly (exact where every step has the same shape)."""
    if start is None:
        return count_flops(lambda: fn(steps))
    fa, fb = count_flops(lambda: fn(start)), count_flops(lambda: fn(start + 1))
    return fa + (steps - start) * (fb - fa)


def _method_and_reference_flops(clip: SplitCLIP, name: str, kwargs: Dict[str, Any], images: torch.Tensor,
                                ids: torch.Tensor, k: Dict[str, int]) -> Tuple[int, int, int]:
    """``(clipib, reference with weight gradients, reference frozen)`` FLOPs on one pair."""
    loop = REFERENCE_LOOPS[name]
    settings = loop.settings(METHODS[name](clip, **kwargs))
    ours_from, ref_from = loop.extrapolate_from or (None, None)

    def ours(s: int) -> None:
        METHODS[name](clip, **{**kwargs, "steps": s}).attribute(images, ids)

    def reference(s: int, grads: bool = True) -> None:
        with loop_weights(clip.model, grads) as model:
            for tower in ("image", "text"):
                loop.map(model, tower, images, ids, k[tower], **{**settings, "steps": s})

    steps = settings["steps"]
    return (_count_steps(ours, steps, ours_from), _count_steps(reference, steps, ref_from),
            _count_steps(lambda s: reference(s, grads=False), steps, ref_from))


def flop_report(clip: SplitCLIP, name: str, kwargs: Optional[dict], rows: List[Dict[str, Any]],
                ref: Dict[str, Any]) -> Dict[str, Any]:
    """Floor, clipib's and the reference's FLOPs per pair (pair 0 of
    :func:`~clipib.bench.common.synthetic_pairs`), the measured matmul rate, and each timing's distance from the
    floor. ``name`` has a loop in :data:`~clipib.bench.reference_loops.REFERENCE_LOOPS`; ``rows`` and ``ref``
    are its throughput rows and reference timings."""
    kwargs = dict(kwargs or {})
    loop = REFERENCE_LOOPS[name]
    method = METHODS[name](clip, **kwargs)
    settings = loop.settings(method)
    images, ids = synthetic_pairs(clip, 1)  # [1, 3, H, W], [1, ctx]
    k = {"image": method.layer_for(clip.image), "text": method.layer_for(clip.text)}
    full = {"image": suffix_flops(clip.image, images, k["image"], False),
            "text": suffix_flops(clip.text, ids, k["text"], False)}
    per = {"image": suffix_flops(clip.image, images, k["image"]), "text": suffix_flops(clip.text, ids, k["text"])}
    floor = sum(loop.floor(settings, f) for f in per.values())
    floor_full = sum(loop.floor(settings, f) for f in full.values())
    ours, theirs, theirs_frozen = _method_and_reference_flops(clip, name, kwargs, images, ids, k)
    with torch.no_grad():
        h = clip.image.prefix(images, k["image"])  # [1, T, D]
    rate = matmul_rate(clip.device, loop.rows(settings) * h.shape[1], h.shape[2])
    floor_s = floor / (rate * 1e9)
    timed = {f"batch_{r['batch_size']}": _timed(r["s_per_pair"], ours, floor_s)
             for r in rows if r["method"] == name and "skipped" not in r}
    return {"suffix_flops_per_row": per, "floor_gflop_per_pair": floor / 1e9,
            "floor_full_last_block_gflop_per_pair": floor_full / 1e9,
            "clipib_gflop_per_pair": ours / 1e9, "reference_gflop_per_pair": theirs / 1e9,
            "matmul_gflop_per_s": rate, "floor_s_per_pair": floor_s, "clipib": timed,
            "reference_frozen_gflop_per_pair": theirs_frozen / 1e9,
            "reference": _timed(ref["s_per_pair_weight_grads"], theirs, floor_s),
            "reference_frozen": _timed(ref["s_per_pair_frozen"], theirs_frozen, floor_s)}


def _timed(s_per_pair: float, flop: int, floor_s: float) -> Dict[str, float]:
    return {"s_per_pair": s_per_pair, "x_floor": s_per_pair / floor_s, "gflop_per_s": flop / s_per_pair / 1e9}
