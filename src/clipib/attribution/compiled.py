"""``compile=True``: the repeated suffix passes of M2IB / AdaIB / NIB through ``torch.compile`` (issue 20).

M2IB's 10 steps × 10 copies and NIB's λ points run the same small graph again and again: one compilation
(Inductor; on a GPU it can add CUDA graphs) serves every step of a batch and every later batch of the same
shapes. Shapes are static (``dynamic=False``): the text tower runs on the batch's longest caption as in
eager mode, so a new longest length or batch size compiles once more (the graphs and recompiles are counted
by :func:`compile_counts`; ``clipib bench`` reports them). Dynamo's cache limit
(``torch._dynamo.config.cache_size_limit``, 8 by default) caps the variants per function; past it the pass
runs eagerly with a warning from torch.

Compiled and eager results agree to float rounding, not bit for bit (fused kernels reorder sums):
``tests/test_compile.py`` states the tolerance. Off by default until proven on a GPU (``benchmarks/
gpu_check.sh``). On the CPU, Inductor needs a C++ compiler: without one, ``compile=True`` raises at
construction (:func:`check_compile`).
"""

from __future__ import annotations

import os
import shutil
from typing import Any, Callable, Dict, Tuple

import torch
from torch import nn


def check_compile(device: torch.device) -> None:
    """Raise a one-line RuntimeError if ``torch.compile`` cannot build kernels for ``device`` here."""
    if not hasattr(torch, "compile"):
        raise RuntimeError(f"compile=True needs torch.compile (torch >= 2.0), this is torch {torch.__version__}")
    if device.type == "cpu":
        names = [os.environ["CXX"]] if os.environ.get("CXX") else ["g++", "clang++", "c++"]
        if not any(shutil.which(n) for n in names):
            raise RuntimeError("compile=True on the CPU needs a C++ compiler for torch.compile's Inductor backend "
                               f"(none of {names} found: install g++ or set CXX), or use compile=False")


class CompiledPasses:
    """``torch.compile`` of ``fn(*static, *tensors)``, one compiled callable per static arguments.

    Static arguments (a tower, a layer, flags) are baked into a closure; modules are keyed by identity (kept
    alive with the callable). Tensors are traced with static shapes.
    """

    def __init__(self, fn: Callable[..., Any]) -> None:
        self.fn = fn
        self._compiled: Dict[Tuple[Any, ...], Tuple[Tuple[Any, ...], Callable[..., Any]]] = {}

    def __call__(self, static: Tuple[Any, ...], *tensors: Any) -> Any:
        key = tuple(("module", id(s)) if isinstance(s, nn.Module) else s for s in static)
        hit = self._compiled.get(key)
        if hit is None or any(a is not b for a, b in zip(hit[0], static) if isinstance(a, nn.Module)):
            fn = self.fn

            def run(*args: Any, _static: Tuple[Any, ...] = static) -> Any:
                return fn(*_static, *args)

            hit = (static, torch.compile(run, dynamic=False))
            self._compiled[key] = hit
        return hit[1](*tensors)

    def __getstate__(self) -> Dict[str, Any]:  # compiled callables are not copied with a method
        return {"fn": self.fn, "_compiled": {}}

    def __deepcopy__(self, memo: Dict[int, Any]) -> "CompiledPasses":
        return CompiledPasses(self.fn)


def compile_counts() -> Dict[str, int]:
    """Process-wide Dynamo counters: ``graphs`` compiled so far (each recompilation adds one) and
    ``frames`` (compiled entry points); read before and after a run for its compilations."""
    from torch._dynamo.utils import counters

    return {"graphs": int(counters["stats"]["unique_graphs"]), "frames": int(counters["frames"]["ok"])}
