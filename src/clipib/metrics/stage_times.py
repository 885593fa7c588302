"""Where an eval run's wall time goes: seconds per stage, summed over batches and processes (issue 20)."""

from __future__ import annotations

from typing import Any, Dict, Sequence

import torch
from torch import Tensor
from torchmetrics import Metric

__all__ = ["StageTimes"]


class StageTimes(Metric):
    """Seconds per named stage and the pairs they covered, summed over batches and processes.

    ``compute()`` gives ``{stage: seconds}`` for every stage (those never timed read 0), plus ``pairs``,
    ``other`` (``total`` minus every other stage: the loop's own bookkeeping) and ``pairs_per_s``
    (``pairs / total`` on one process; with several processes the summed seconds of all of them). Requires a
    stage named ``total``.

    Example:
        >>> t = StageTimes(["data_wait", "work", "total"])
        >>> t.update("data_wait", 0.5); t.update("work", 2.0); t.update("total", 3.0); t.add_pairs(6)
        >>> {k: float(v) for k, v in t.compute().items()}
        {'data_wait': 0.5, 'work': 2.0, 'total': 3.0, 'other': 0.5, 'pairs': 6.0, 'pairs_per_s': 2.0}
    """

    is_differentiable = False
    full_state_update = False

    seconds: Tensor
    pairs: Tensor

    def __init__(self, stages: Sequence[str], **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.stages = list(dict.fromkeys(stages))
        if "total" not in self.stages or "other" in self.stages or "pairs" in self.stages:
            raise ValueError(f"stages must include 'total' and not 'other' or 'pairs', got {self.stages}")
        self._index = {s: i for i, s in enumerate(self.stages)}
        self.add_state("seconds", default=torch.zeros(len(self.stages), dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("pairs", default=torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, stage: str, seconds: float) -> None:  # type: ignore[override]
        """Add ``seconds`` to ``stage`` (one of the stages given at construction)."""
        if stage not in self._index:
            raise KeyError(f"unknown stage {stage!r}; stages: {self.stages}")
        self.seconds[self._index[stage]] += seconds

    def add_pairs(self, pairs: int) -> None:
        """Count ``pairs`` pairs as processed."""
        self.pairs += pairs

    def compute(self) -> Dict[str, Tensor]:
        """``{stage: seconds, ..., "other", "pairs", "pairs_per_s"}``."""
        out = {s: self.seconds[i] for s, i in self._index.items()}
        total = out["total"]
        out["other"] = total - sum(v for s, v in out.items() if s != "total")
        out["pairs"] = self.pairs
        out["pairs_per_s"] = self.pairs / total.clamp_min(1e-12)
        return out
