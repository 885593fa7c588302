"""The one aggregator of per-sample values and the base class of every eval metric.

:class:`SeedMeanStd` accumulates per-sample values, per value name and per seed, in summed float64 states
(``dist_reduce_fx="sum"``: sum, sum of squares, count, skipped), so a multi-process ``compute()`` equals the
single-process one exactly. :class:`AttributionMetric` is a :class:`SeedMeanStd` that also scores a batch:
its ``update(clip, batch, attr, modality, seed_index)`` calls the subclass's :meth:`~AttributionMetric.score`
(the metric's kernels), accumulates and returns the per-sample values for the records.
"""
from __future__ import annotations

import dataclasses
import functools
import math
import zlib
from typing import Any, Callable, ClassVar, Dict, List, Mapping, Optional, Sequence, Tuple

import torch
from torch import Tensor
from torchmetrics import Metric

from clipib.attribution.base import Attribution, Attributor
from clipib.models.split import SplitCLIP

__all__ = ["SeedMeanStd", "AttributionMetric", "nanquantile_linear", "default_eot", "key_generators", "degenerate_maps"]

Batch = Mapping[str, Any]
"""The eval batch: ``image [B, 3, H, W]``, ``ids [B, ctx]``, ``key``, ``matched [B]`` and optional ground truth."""

_STATES = ("total", "total_sq", "count", "skipped")


class SeedMeanStd(Metric):
    """Mean ± std of per-sample values for each of ``names``, over ``n_seeds`` seeds.

    Per value: ``mean`` is the mean over seeds of the per-seed sample means; ``std`` the standard deviation of
    those per-seed means across seeds when there are ≥ 2 seeds (AdaIB reports mean ± std over seeds 42-46),
    else the sample standard deviation across samples (``std_over_seeds`` says which); ``n`` the number of
    samples of seed 0; ``skipped`` how many of seed 0's values were NaN (or inf): a metric undefined for a
    sample, e.g. EHR on a large object. ``mean`` is NaN when no sample was scored.

    Example:
        >>> m = SeedMeanStd(["iou"], n_seeds=2)
        >>> m.add({"iou": torch.tensor([1.0, 3.0])}, seed_index=0)
        >>> m.add({"iou": torch.tensor([2.0, 4.0, float("nan")])}, seed_index=1)
        >>> {k: round(float(v), 4) for k, v in m.compute()["iou"].items()}
        {'mean': 2.5, 'std': 0.7071, 'n': 2.0, 'skipped': 0.0, 'std_over_seeds': 1.0}
    """

    is_differentiable = False
    higher_is_better: Optional[bool] = None
    full_state_update = False

    total: Tensor
    total_sq: Tensor
    count: Tensor
    skipped: Tensor

    def __init__(self, names: Sequence[str], n_seeds: int = 1, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        if n_seeds < 1:
            raise ValueError(f"n_seeds must be >= 1, got {n_seeds}")
        self.names: Tuple[str, ...] = tuple(dict.fromkeys(names))
        self.n_seeds = n_seeds
        zeros = torch.zeros(len(self.names), n_seeds, dtype=torch.float64)  # [V, S]
        for state in _STATES:
            self.add_state(state, default=zeros.clone(), dist_reduce_fx="sum")

    def update(self, values: Dict[str, Tensor], seed_index: int = 0) -> None:
        """Accumulate per-sample ``values`` ``{name: Tensor[B]}`` of seed number ``seed_index``."""
        self._accumulate(values, seed_index)

    def add(self, values: Dict[str, Tensor], seed_index: int = 0) -> None:
        """Accumulate already-computed per-sample ``values`` ``{name: Tensor[B]}`` (e.g. a resumed run's records)."""
        self._computed = None
        self._update_count += 1
        self._accumulate(values, seed_index)

    def _accumulate(self, values: Dict[str, Tensor], seed_index: int) -> None:
        if not 0 <= seed_index < self.n_seeds:
            raise IndexError(f"seed_index {seed_index} out of range for n_seeds={self.n_seeds}")
        for name, v in values.items():
            if name not in self.names:
                raise KeyError(f"unknown value {name!r}; this metric aggregates {list(self.names)}")
            i = self.names.index(name)
            v = torch.as_tensor(v).detach().to(self.total.device, torch.float64).flatten()
            ok = torch.isfinite(v)
            self.total[i, seed_index] += v[ok].sum()
            self.total_sq[i, seed_index] += (v[ok] ** 2).sum()
            self.count[i, seed_index] += ok.sum()
            self.skipped[i, seed_index] += (~ok).sum()

    def compute(self) -> Dict[str, Dict[str, Tensor]]:
        """``{name: {"mean", "std", "n", "skipped", "std_over_seeds"}}`` over all processes."""
        count = self.count.clamp_min(1)  # [V, S]
        means = torch.where(self.count > 0, self.total / count, torch.full_like(self.total, float("nan")))
        if self.n_seeds >= 2:
            std = means.std(dim=1, unbiased=True)  # [V]
        else:
            var = (self.total_sq / count - means**2) * self.count / (self.count - 1).clamp_min(1)
            std = var.clamp_min(0).sqrt()[:, 0]
        over_seeds = torch.tensor(float(self.n_seeds >= 2), dtype=torch.float64)
        return {name: {"mean": means[i].mean(), "std": std[i], "n": self.count[i, 0],
                       "skipped": self.skipped[i, 0], "std_over_seeds": over_seeds}
                for i, name in enumerate(self.names)}


class AttributionMetric(SeedMeanStd):
    """An eval metric: scores a batch's attribution per sample and aggregates with :class:`SeedMeanStd`.

    A subclass declares the value names it produces per modality in :attr:`VALUES` and implements
    :meth:`score` with its kernels; the constructor's keyword arguments are the metric's config settings.
    ``update(clip, batch, attr, modality, seed_index=0)`` returns the per-sample values it accumulated
    (``{}`` for a modality the metric does not score).

    Example (a toy metric: the mean of each image map):
        >>> class MapMean(AttributionMetric):
        ...     VALUES = {"image": ("map_mean",)}
        ...     def score(self, clip, batch, attr, modality):
        ...         return {"map_mean": attr.image.flatten(1).mean(1)}
        >>> metric = MapMean()
        >>> metric.value_names("image"), metric.value_names("text")
        (['map_mean'], [])
        >>> metric.update(None, {}, Attribution(image=torch.arange(32.0).reshape(2, 4, 4)), "image")
        {'map_mean': tensor([ 7.5000, 23.5000])}
        >>> float(metric.compute()["map_mean"]["mean"])
        15.5
    """

    VALUES: ClassVar[Dict[str, Tuple[str, ...]]] = {}
    """``{modality: value names}`` for ``"image"`` and ``"text"``; a modality absent here is not scored."""
    CONSTANT_MAP: ClassVar[str] = "nan"
    """What the metric gives for a pair whose map is constant over its valid entries (all-zero included):
    ``"nan"`` (undefined: the value is NaN, counted in ``skipped``), ``"value"`` (the kernel's value is
    meaningful, e.g. a blank map's mass) or ``"unused"`` (the metric does not read the map). A map with a NaN or
    inf is NaN for every metric that reads maps (docs/metrics.md, "Degenerate inputs")."""
    needs_method: ClassVar[bool] = False
    """True for a metric that re-runs the method (randomisation, robustness): :meth:`update` then needs
    ``method=`` (the :class:`~clipib.attribution.base.Attributor` that made ``attr``) and ``seeds=`` (the
    per-pair seeds it ran with), which :meth:`score` receives as keywords."""
    resumable: ClassVar[bool] = True
    """False for a dataset-level metric whose state cannot be rebuilt from the per-pair records (retrieval ROAR
    keeps every pair's embeddings): an eval run with such a metric refuses to resume a partly finished run."""

    def __init__(self, n_seeds: int = 1, **kwargs: Any) -> None:
        names = [n for modality in ("image", "text") for n in self.VALUES.get(modality, ())]
        super().__init__(names, n_seeds=n_seeds, **kwargs)

    def value_names(self, modality: str) -> List[str]:
        """The value names :meth:`update` produces for ``modality`` (``"image"`` or ``"text"``; may be empty)."""
        if modality not in ("image", "text"):
            raise ValueError(f"modality must be 'image' or 'text', got {modality!r}")
        return list(self.VALUES.get(modality, ()))

    def score(self, clip: SplitCLIP, batch: Batch, attr: Attribution, modality: str) -> Dict[str, Tensor]:
        """Per-sample values ``{name: Tensor[B]}`` (NaN = undefined) for a modality in :attr:`VALUES`."""
        raise NotImplementedError

    def update(  # type: ignore[override]
        self, clip: SplitCLIP, batch: Batch, attr: Attribution, modality: str, seed_index: int = 0,
        method: Optional[Attributor] = None, seeds: Optional[Sequence[int]] = None,
    ) -> Dict[str, Tensor]:
        """Score the batch's attribution for ``modality``, accumulate for seed ``seed_index`` and return the values.

        ``method`` and ``seeds`` (what ``attr`` was computed with) are passed on to :meth:`score` when
        :attr:`needs_method` is set, and ignored otherwise.
        """
        names = self.value_names(modality)
        if not names:
            return {}
        bad = None if self.CONSTANT_MAP == "unused" else degenerate_maps(
            attr, modality, clip, batch.get("ids") if hasattr(batch, "get") else None,
            constant=self.CONSTANT_MAP == "nan")
        if bad is not None and bad.any():
            attr = _blanked(attr, modality, bad)  # kernels refuse NaN maps: score zeros, report NaN
        if self.needs_method:
            if method is None:
                raise ValueError(f"{type(self).__name__} re-runs the method: pass method= (and seeds=) to update")
            values = self.score(clip, batch, attr, modality, method=method, seeds=seeds)
        else:
            values = self.score(clip, batch, attr, modality)
        if sorted(values) != sorted(names):
            raise RuntimeError(f"{type(self).__name__}.score returned {sorted(values)}, declared {names}")
        if bad is not None and bad.any():
            values = {k: _nan_rows(v, bad) for k, v in values.items()}
        self._accumulate(values, seed_index)
        return values

    def _wrap_update(self, update: Callable) -> Callable:
        """torchmetrics' update wrapper (cache reset, update count, grad mode), returning ``update``'s result."""
        out: Dict[str, Any] = {}

        def keep(*args: Any, **kwargs: Any) -> None:
            out["values"] = update(*args, **kwargs)

        wrapped = super()._wrap_update(keep)

        @functools.wraps(update)
        def returning(*args: Any, **kwargs: Any) -> Any:
            wrapped(*args, **kwargs)
            return out.pop("values")

        return returning


def degenerate_maps(attr: Attribution, modality: str, clip: Any = None, ids: Optional[Tensor] = None,
                    constant: bool = True) -> Optional[Tensor]:
    """``[B]`` bool: the pair's ``modality`` map has a NaN or inf, or (``constant``) is constant over its valid
    entries - all-zero included, which is what a constant raw score becomes. None without that map.

    Text maps are read over SOT..EOT (``clip.text.span_mask(ids)``) when ``clip`` and ``ids`` are given.

    Example:
        >>> maps = torch.tensor([[[0.0, 1.0]], [[0.0, 0.0]], [[float("nan"), 1.0]]])
        >>> degenerate_maps(Attribution(image=maps), "image")
        tensor([False,  True,  True])
    """
    maps = attr.image if modality == "image" else attr.text
    if maps is None:
        return None
    flat = maps.detach().flatten(1).float()  # [B, N]
    valid = torch.ones_like(flat, dtype=torch.bool)
    span = getattr(getattr(clip, "text", None), "span_mask", None)
    if modality == "text" and span is not None and ids is not None:
        valid = span(ids).flatten(1).to(flat.device)
    bad = (~torch.isfinite(flat) & valid).any(1)
    if constant:
        lo = flat.masked_fill(~valid, math.inf).amin(1)
        hi = flat.masked_fill(~valid, -math.inf).amax(1)
        bad |= ~(hi > lo)
    return bad


def _blanked(attr: Attribution, modality: str, bad: Tensor) -> Attribution:
    """``attr`` with the ``bad`` rows of the modality's maps set to 0 (a finite stand-in; their values become NaN)."""
    fields = ("image", "image_grid") if modality == "image" else ("text", "text_raw")
    change = {}
    for name in fields:
        t = getattr(attr, name)
        if t is not None:
            mask = bad.to(t.device).view(-1, *([1] * (t.ndim - 1)))
            change[name] = torch.where(mask, torch.zeros_like(t), t)
    return dataclasses.replace(attr, **change)


def _nan_rows(v: Tensor, bad: Tensor) -> Tensor:
    v = torch.as_tensor(v)
    if not v.is_floating_point():
        v = v.double()
    return v.masked_fill(bad.to(v.device).view(-1, *([1] * (v.ndim - 1))), math.nan)


def default_eot(ids: Tensor, eot: Optional[Tensor] = None) -> Tensor:
    """EOT positions ``[B]``: ``eot`` when given, else ``ids.argmax(-1)`` (open_clip's rule for CLIP's BPE).

    Model-free kernels take ``eot`` so a caller can pass ``clip.text.eot_positions(ids)`` for other tokenizers.

    Example:
        >>> default_eot(torch.tensor([[49406, 320, 49407, 0]]))
        tensor([2])
    """
    return ids.argmax(-1) if eot is None else eot


def caption_rule(text: Any, ids: Tensor) -> Tuple[Tensor, int]:
    """``(caption ends [B], first content position)`` of ``ids`` under a text tower's own rule
    (``TextTower.caption_ends`` / ``content_start``: EOT and 1 for CLIP, the EOS and 0 for SigLIP / SigLIP 2);
    a tower without them (duck-typed test doubles) is read as CLIP's: its ``eot_positions`` and 1."""
    ends = getattr(text, "caption_ends", text.eot_positions)(ids)
    return ends, int(getattr(text, "content_start", 1))


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


def key_generators(batch: Batch, seed: int = 0) -> List[torch.Generator]:
    """One CPU generator per sample, seeded from the sample's ``key`` and ``seed`` (crc32), for metrics that draw.

    A sample's draws then depend on its key alone - not on the batch it is in, the batch size or the process
    count - so 2 processes give the values of 1. A batch without ``key`` is one clear error.

    Example:
        >>> a = key_generators({"key": ["x", "y"]})[1]
        >>> bool(torch.rand(1, generator=a) == torch.rand(1, generator=key_generators({"key": ["y"]})[0]))
        True
    """
    keys = batch.get("key")
    if keys is None:
        raise ValueError("this metric draws random subsets per sample and needs batch['key'] to seed them")
    return [torch.Generator().manual_seed(zlib.crc32(f"{seed}:{k}".encode()) & 0x7FFFFFFF) for k in keys]


def average_ranks(x: Tensor, valid: Optional[Tensor] = None) -> Tensor:
    """1-based ascending ranks of each row of ``x [B, N]`` among its ``valid`` entries, ties sharing their mean
    rank (float64); invalid entries get rank 0. Sort-based: ``O(N log N)`` per row, fine for pixel maps.

    Example:
        >>> average_ranks(torch.tensor([[3.0, 1.0, 3.0, 2.0]]))
        tensor([[3.5000, 1.0000, 3.5000, 2.0000]], dtype=torch.float64)
        >>> average_ranks(torch.tensor([[5.0, 7.0, 6.0]]), torch.tensor([[False, True, True]]))
        tensor([[0., 2., 1.]], dtype=torch.float64)
    """
    if valid is not None:  # invalid entries sort after every valid one, so they change no valid rank
        x = x.masked_fill(~valid, float("inf"))
    srt = x.sort(dim=1).values.contiguous()
    x = x.contiguous()
    lo = torch.searchsorted(srt, x, right=False)  # entries below
    hi = torch.searchsorted(srt, x, right=True)  # entries at or below
    ranks = (lo + hi + 1).double() / 2
    return ranks if valid is None else ranks * valid
