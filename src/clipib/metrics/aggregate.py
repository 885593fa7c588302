"""Mean ± std over seeds of per-sample values, with summed states (exact under multi-process sync)."""

from __future__ import annotations

from typing import Dict

import torch
from torch import Tensor
from torchmetrics import Metric


class SeedMeanStd(Metric):
    """Aggregates per-sample values of one metric for ``n_seeds`` seeds.

    ``mean`` is the mean over seeds of the per-seed sample means; ``std`` is the standard deviation of those
    per-seed means across seeds (AdaIB reports mean ± std over seeds 42-46) when there are ≥ 2 seeds, else the
    standard deviation across samples (``std_over`` says which); ``n`` is the number of samples per seed.
    NaN values (a metric undefined for a sample, e.g. EHR on a skipped object) are counted in ``skipped``.

    >>> m = SeedMeanStd(n_seeds=2)
    >>> m.update(torch.tensor([1.0, 3.0]), seed_index=0)
    >>> m.update(torch.tensor([2.0, 4.0]), seed_index=1)
    >>> {k: round(float(v), 4) for k, v in m.compute().items()}
    {'mean': 2.5, 'std': 0.7071, 'n': 2.0, 'skipped': 0.0, 'std_over_seeds': 1.0}
    """

    full_state_update = False

    def __init__(self, n_seeds: int = 1, **kwargs) -> None:
        super().__init__(**kwargs)
        self.n_seeds = n_seeds
        for name in ("total", "total_sq", "count", "skipped"):
            self.add_state(name, default=torch.zeros(n_seeds, dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, values: Tensor, seed_index: int = 0) -> None:
        """Add per-sample ``values`` ``[B]`` of seed number ``seed_index``."""
        values = values.detach().to(torch.float64).flatten()
        ok = torch.isfinite(values)
        self.total[seed_index] += values[ok].sum()
        self.total_sq[seed_index] += (values[ok] ** 2).sum()
        self.count[seed_index] += ok.sum()
        self.skipped[seed_index] += (~ok).sum()

    def compute(self) -> Dict[str, Tensor]:
        """``{"mean", "std", "n", "skipped", "std_over_seeds"}`` (NaN mean when no sample counted)."""
        count = self.count.clamp_min(1)
        means = torch.where(self.count > 0, self.total / count, torch.full_like(self.total, float("nan")))
        if self.n_seeds >= 2:
            std = means.std(unbiased=True)
        else:
            var = (self.total_sq / count - means**2) * self.count / (self.count - 1).clamp_min(1)
            std = var.clamp_min(0).sqrt()[0]
        return {"mean": means.mean(), "std": std, "n": self.count[0], "skipped": self.skipped[0],
                "std_over_seeds": torch.tensor(float(self.n_seeds >= 2))}


class Throughput(Metric):
    """Pairs per second (Σ pairs / Σ seconds, per process) and peak memory in MiB (max over processes).

    >>> t = Throughput()
    >>> t.update(pairs=8, seconds=2.0, peak_mib=100.0)
    >>> t.update(pairs=4, seconds=1.0, peak_mib=50.0)
    >>> {k: float(v) for k, v in t.compute().items()}
    {'pairs_per_s': 4.0, 'peak_mib': 100.0, 'pairs': 12.0}
    """

    full_state_update = False

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.add_state("pairs", default=torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("seconds", default=torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("peak_mib", default=torch.zeros((), dtype=torch.float64), dist_reduce_fx="max")

    def update(self, pairs: int, seconds: float, peak_mib: float) -> None:
        """Add one timed batch."""
        self.pairs += pairs
        self.seconds += seconds
        self.peak_mib = torch.maximum(self.peak_mib, torch.tensor(peak_mib, dtype=torch.float64))

    def compute(self) -> Dict[str, Tensor]:
        """``{"pairs_per_s", "peak_mib", "pairs"}``."""
        return {"pairs_per_s": self.pairs / self.seconds.clamp_min(1e-12), "peak_mib": self.peak_mib,
                "pairs": self.pairs}
