"""Numerical precision of an attribution's passes: ``"fp32"`` (default, the papers' setting), ``"tf32"``
(TF32 matmuls and convolutions on CUDA; no effect elsewhere) or ``"bf16"`` (``torch.autocast`` to bfloat16
on the inputs' device).

Both are speed options, not the papers' setting: the maps move by a measured amount (``docs/
benchmarks.md``; tolerances in ``tests/test_speed_options.py``). The clean target embeddings and
the normalisation stay in float32.
"""

from __future__ import annotations

import contextlib
from typing import Iterator, Literal

import torch

Precision = Literal["fp32", "tf32", "bf16"]
PRECISIONS = ("fp32", "tf32", "bf16")


def check_precision(precision: str) -> str:
    """``precision`` if it is one of :data:`PRECISIONS`, else a one-line ``ValueError``."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    return precision


@contextlib.contextmanager
def precision_context(precision: str, device: torch.device) -> Iterator[None]:
    """Run the enclosed passes at ``precision`` on ``device`` (the global TF32 flags are restored after)."""
    check_precision(precision)
    if precision == "bf16":
        with torch.autocast(device_type=device.type, dtype=torch.bfloat16):
            yield
    elif precision == "tf32":
        flags = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
        try:
            yield
        finally:
            torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = flags
    else:
        yield
