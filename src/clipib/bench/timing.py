"""The one timer and the one Spearman ρ of clipib.

:func:`start_timer` / :func:`stop_timer` time a call and read its peak memory (the Lightning module's per-batch
speed records use them); :func:`measure` wraps them for the benchmark, which adds CPU seconds and resets the CPU
peak per measurement; :func:`spearman` is the rank correlation every agreement figure reports.

>>> start = start_timer(torch.device("cpu"))
>>> secs, peak_mib = stop_timer(torch.device("cpu"), start)
>>> secs >= 0 and peak_mib > 0
True
>>> round(spearman(torch.tensor([1.0, 2.0, 3.0]), torch.tensor([10.0, 20.0, 40.0])), 4)
1.0
"""

from __future__ import annotations

import contextlib
import resource
import time
from typing import TYPE_CHECKING, Any, Callable, Dict, Iterator, List, Tuple

import torch
from torch import Tensor

if TYPE_CHECKING:
    from clipib.attribution import Attribution


def start_timer(device: torch.device) -> float:
    """Start timing work on ``device``: wait for queued CUDA work and reset CUDA's peak-memory counter; returns
    the start time (``time.perf_counter()``) to hand to :func:`stop_timer`."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    return time.perf_counter()


def stop_timer(device: torch.device, start: float) -> Tuple[float, float]:
    """``(seconds, peak MiB)`` since :func:`start_timer`: CUDA peak allocated for the timed call (after waiting
    for it), else the process's peak RSS so far (``resource.getrusage``)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        return time.perf_counter() - start, torch.cuda.max_memory_allocated(device) / 2**20
    return time.perf_counter() - start, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: kB


def seconds(fn: Callable[[], Any], device: torch.device) -> float:
    """Wall seconds of ``fn()`` on ``device`` (queued CUDA work included)."""
    start = start_timer(device)
    fn()
    return stop_timer(device, start)[0]


def reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS counter (VmHWM) of this process; False where that is not possible."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _proc_status_mib(field: str) -> float:
    """A ``kB`` field of ``/proc/self/status`` (``VmHWM``, ``VmRSS``) in MiB; raises OSError/StopIteration."""
    with open("/proc/self/status") as f:
        return int(next(x for x in f if x.startswith(f"{field}:")).split()[1]) / 1024


def peak_rss_mib() -> float:
    """The process's peak RSS (MiB) since start or the last :func:`reset_peak_rss`."""
    try:
        return _proc_status_mib("VmHWM")
    except (OSError, StopIteration):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: kB


def rss_mib() -> float:
    """The process's current RSS (MiB), from ``/proc/self/status``."""
    return _proc_status_mib("VmRSS")


@contextlib.contextmanager
def measure(device: torch.device) -> Iterator[Dict[str, Any]]:
    """Wall and CPU seconds and peak memory (MiB) of the enclosed block: ``torch.cuda.max_memory_allocated``
    on CUDA; on the CPU the process's peak RSS, reset at entry (VmHWM) or, if that fails, since start.

    Yields the record it fills on exit: ``memory`` (what ``peak_mb`` is), ``wall_s``, ``cpu_s``, ``peak_mb``.
    """
    rec: Dict[str, Any] = {}
    cuda = device.type == "cuda"
    if cuda:
        rec["memory"] = "cuda max_memory_allocated"
    else:
        rec["memory"] = "peak RSS (VmHWM reset per measurement)" if reset_peak_rss() else "peak RSS since start"
    start, cpu = start_timer(device), time.process_time()
    yield rec
    wall, peak = stop_timer(device, start)
    rec["wall_s"], rec["cpu_s"] = wall, time.process_time() - cpu
    rec["peak_mb"] = peak if cuda else peak_rss_mib()


def spearman(a: Tensor, b: Tensor) -> float:
    """Spearman ρ of two score tensors of the same number of elements (flattened, in float64 on the CPU)."""
    from torchmetrics.functional import spearman_corrcoef

    return float(spearman_corrcoef(a.flatten().double().cpu(), b.flatten().double().cpu()))


def attribution_rhos(a: Attribution, b: Attribution, spans: Tensor) -> Tuple[List[float], List[float]]:
    """Per-pair ρ of two attributions: of the image grids, and of the raw token scores over ``spans``
    ``[B, ctx]`` bool (``clip.text.span_mask(ids)``: SOT..EOT)."""
    spans = spans.cpu()
    img = [spearman(a.image_grid[i], b.image_grid[i]) for i in range(spans.shape[0])]
    txt = [spearman(a.text_raw[i].cpu()[m], b.text_raw[i].cpu()[m]) for i, m in enumerate(spans)]
    return img, txt
