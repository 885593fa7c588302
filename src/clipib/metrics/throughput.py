"""Throughput of an eval run: pairs per second and peak accelerator memory, with summed / max states."""

from __future__ import annotations

from typing import Any, Dict

import torch
from torch import Tensor
from torchmetrics import Metric

__all__ = ["Throughput"]


class Throughput(Metric):
    """Pairs per second (Σ pairs / Σ seconds over processes) and peak memory in MiB (max over processes).

    Example:
        >>> t = Throughput()
        >>> t.update(pairs=8, seconds=2.0, peak_mib=100.0)
        >>> t.update(pairs=4, seconds=1.0, peak_mib=50.0)
        >>> {k: float(v) for k, v in t.compute().items()}
        {'pairs_per_s': 4.0, 'peak_mib': 100.0, 'pairs': 12.0}
    """

    is_differentiable = False
    full_state_update = False

    pairs: Tensor
    seconds: Tensor
    peak_mib: Tensor

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.add_state("pairs", default=torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("seconds", default=torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("peak_mib", default=torch.zeros((), dtype=torch.float64), dist_reduce_fx="max")

    def update(self, pairs: int, seconds: float, peak_mib: float) -> None:
        """Add one timed batch of ``pairs`` pairs that took ``seconds`` and peaked at ``peak_mib`` MiB."""
        self.pairs += pairs
        self.seconds += seconds
        self.peak_mib = torch.maximum(self.peak_mib, torch.tensor(peak_mib, dtype=torch.float64,
                                                                  device=self.peak_mib.device))

    def compute(self) -> Dict[str, Tensor]:
        """``{"pairs_per_s", "peak_mib", "pairs"}``."""
        return {"pairs_per_s": self.pairs / self.seconds.clamp_min(1e-12), "peak_mib": self.peak_mib,
                "pairs": self.pairs}
