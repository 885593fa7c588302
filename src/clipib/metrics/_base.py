"""Shared base for per-sample metrics: summed states, so multi-process values are exact.

Every clipib metric of this family computes one scalar per sample with a functional kernel and
accumulates ``sum``, ``sum of squares``, ``count`` and ``skipped`` as ``dist_reduce_fx="sum"`` states
(float64 sums). A kernel marks a sample it cannot score (e.g. an empty ground-truth region, or
EHR's ROI covering more than 33 %) with NaN; the metric counts such samples in ``skipped`` instead of
dropping them silently. ``compute()`` returns the mean; ``summary()`` returns mean, sample standard
deviation (``n - 1`` in the denominator), ``n`` and ``skipped``.
"""
from __future__ import annotations

import torch
from torch import Tensor
from torchmetrics import Metric


class SampleMeanMetric(Metric):
    """Mean (and std) of a per-sample value over all samples seen on all processes.

    Subclasses implement ``update`` by computing per-sample values ``[B]`` and calling
    :meth:`_accumulate`. NaN entries are counted as skipped.

    Example:
        >>> m = SampleMeanMetric()
        >>> m.update(torch.tensor([1.0, 3.0, float("nan")]))
        >>> m.compute()
        tensor(2., dtype=torch.float64)
        >>> {k: round(float(v), 4) for k, v in m.summary().items()}
        {'mean': 2.0, 'std': 1.4142, 'n': 2.0, 'skipped': 1.0}
    """

    is_differentiable = False
    higher_is_better: bool | None = True
    full_state_update = False

    total: Tensor
    total_sq: Tensor
    count: Tensor
    skipped: Tensor

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        zero = torch.tensor(0.0, dtype=torch.float64)
        self.add_state("total", default=zero.clone(), dist_reduce_fx="sum")
        self.add_state("total_sq", default=zero.clone(), dist_reduce_fx="sum")
        self.add_state("count", default=zero.clone(), dist_reduce_fx="sum")
        self.add_state("skipped", default=zero.clone(), dist_reduce_fx="sum")

    def update(self, values: Tensor) -> None:
        """Accumulate per-sample values ``[B]`` directly (NaN = skipped)."""
        self._accumulate(values)

    def _accumulate(self, values: Tensor) -> None:
        """Add per-sample values ``[B]``; NaN entries count as skipped."""
        v = values.detach().reshape(-1).to(torch.float64)
        ok = ~torch.isnan(v)
        self.total += v[ok].sum()
        self.total_sq += (v[ok] ** 2).sum()
        self.count += ok.sum()
        self.skipped += (~ok).sum()

    def compute(self) -> Tensor:
        """Mean over the scored samples (NaN when none was scored)."""
        return self.total / self.count

    def summary(self) -> dict[str, Tensor]:
        """``{"mean", "std", "n", "skipped"}`` over all processes; std is the sample std (0 when n < 2)."""
        with self.synced():
            n = self.count.clone()
            mean = self.total / n
            var = (self.total_sq - n * mean**2) / (n - 1).clamp(min=1)
            std = var.clamp(min=0).sqrt() if n > 1 else torch.zeros_like(var)
            return {"mean": mean, "std": std, "n": n, "skipped": self.skipped.clone()}

    def synced(self):
        """Context in which the states hold the all-process values (as inside ``compute``)."""
        return self.sync_context(
            dist_sync_fn=self.dist_sync_fn, should_sync=self._to_sync, should_unsync=self._should_unsync
        )

def nanquantile_linear(x: Tensor, q: Tensor | float) -> Tensor:
    """Row-wise quantiles of ``x [B, N]`` ignoring NaN, linear interpolation (NumPy's default).

    Sort-based, so it has no input-size limit (``torch.quantile`` refuses > 16M elements).
    Returns ``[B, Q]`` for a 1-D ``q`` and ``[B]`` for a scalar; rows with no finite value give NaN.

    Example:
        >>> nanquantile_linear(torch.tensor([[1.0, 2.0, 3.0, 4.0], [5.0, float("nan"), 7.0, 6.0]]), 0.5)
        tensor([2.5000, 6.0000])
    """
    qs = torch.as_tensor(q, dtype=x.dtype, device=x.device)
    scalar = qs.ndim == 0
    qs = qs.reshape(-1)  # [Q]
    srt = x.sort(dim=1).values  # [B, N], NaN last
    n = (~torch.isnan(x)).sum(dim=1, keepdim=True)  # [B, 1]
    pos = qs[None, :] * (n - 1).clamp(min=0).to(x.dtype)  # [B, Q]
    lo = pos.floor().long()
    hi = pos.ceil().long()
    v_lo, v_hi = srt.gather(1, lo), srt.gather(1, hi)
    out = v_lo + (v_hi - v_lo) * (pos - lo.to(x.dtype))
    out = torch.where(n > 0, out, torch.full_like(out, float("nan")))
    return out[:, 0] if scalar else out
