"""Clean tower passes shared within one eval batch: :class:`PassCache` (issue 20).

Every method's :meth:`~clipib.attribution.Attributor.attribute` encodes both towers' clean inputs, the
bottlenecks (M2IB, AdaIB) and NIB run ``tower.prefix(x, k)`` at their layer, and several metrics encode the
clean pair again. Inside ``with PassCache(...):`` :meth:`Tower.encode <clipib.models.split.Tower.encode>` and
:meth:`Tower.prefix <clipib.models.split.Tower.prefix>` are memoised per (tower, input tensor, numerics): the
first call computes, later calls with the *same* tensor object return the stored result. A prefix at layer
``k`` starts from the deepest stored state at a layer ``<= k`` of the same input; a clean ``encode`` stores
the residual streams at the ``layers`` it was told every method of the run cuts at, so the clean pass also
yields every method's prefix. Results are identical to uncached calls: the same blocks run on the same
tensors, only split into segments (``tests/test_speed_options.py::test_pass_cache_*``).

When a call is *not* shared (computed as without the cache): outside a ``with`` block; when autograd could
reach the tower's weights or the input (grad enabled and the input or a weight requires grad); for a different
input tensor, even one with equal values. An entry is keyed by the input's identity, checked against a weak
reference (a freed tensor's id reused by another never hits) and the input's and weights' in-place version
counters (writes through ``.data``, which bypass the counters, are not seen: change weights under
``torch.no_grad()`` as :mod:`clipib.metrics.randomisation` does, or outside the ``with`` block); numerics (autocast on the input's device and its dtype, TF32 flags, float32 matmul precision) are
part of the key, so a ``precision="bf16"`` method never reads an fp32 prefix. Stored outputs are returned as
they are; one modified in place is recomputed. Entries die with their input tensor and all of them when the
``with`` block exits: nothing outlives the batch.
"""

from __future__ import annotations

import contextvars
import functools
import inspect
import weakref
from dataclasses import dataclass, field
from typing import Any, Dict, Iterable, Mapping, Optional, Tuple

import torch
from torch import Tensor, nn

TowerLike = nn.Module
"""A :class:`clipib.models.split.Tower` (``embed``, ``run``, ``head``, ``n_layers``); not imported here, since
``split`` imports this module."""

_ACTIVE: contextvars.ContextVar[Optional["PassCache"]] = contextvars.ContextVar("clipib_pass_cache", default=None)


def active_cache() -> Optional["PassCache"]:
    """The :class:`PassCache` of the enclosing ``with`` block, or None."""
    return _ACTIVE.get()


def _numerics(device: torch.device) -> Tuple[Any, ...]:
    """What changes a pass's numbers besides its inputs: autocast state and dtype, TF32 flags, matmul precision."""
    kind = device.type
    autocast = torch.is_autocast_enabled(kind)
    return (autocast, torch.get_autocast_dtype(kind) if autocast else None,
            torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32,
            torch.get_float32_matmul_precision())


@functools.lru_cache(maxsize=None)
def _run_takes_input(cls: type) -> bool:
    """Whether ``cls.run`` takes the tower's input rows as ``x=`` (towers that mask padding need them)."""
    return "x" in inspect.signature(cls.run).parameters


def _blocks(tower: TowerLike, h: Tensor, start: int, stop: int, x: Tensor) -> Tensor:
    """``tower.run(h, start, stop)``, handing it the input rows where its ``run`` takes them."""
    return tower.run(h, start, stop, x=x) if _run_takes_input(type(tower)) else tower.run(h, start, stop)


def _weights_version(tower: TowerLike) -> int:
    """Sum of the tower's parameters' in-place version counters (changes when a weight is written in place)."""
    return sum(p._version for p in tower.parameters())


@dataclass
class _Entry:
    """What is stored for one (tower, input, numerics): residual streams by layer and the embedding."""

    tower: "weakref.ReferenceType"
    x: "weakref.ReferenceType[Tensor]"
    versions: Tuple[int, int]
    states: Dict[int, Tuple[Tensor, int]] = field(default_factory=dict)
    embedding: Optional[Tuple[Tensor, int]] = None


def _fresh(stored: Optional[Tuple[Tensor, int]]) -> Optional[Tensor]:
    """The stored tensor if it was not modified in place since it was stored."""
    if stored is None or stored[0]._version != stored[1]:
        return None
    return stored[0]


class PassCache:
    """Per-batch memo of clean :meth:`Tower.encode` / :meth:`Tower.prefix` calls (module docstring).

    Args:
        layers: per tower, the layers whose residual streams a clean ``encode`` stores (the layers the run's
            methods cut at). Default: none (a prefix is then stored when it is first computed).

    Use one per batch: ``with PassCache({clip.image: {10}, clip.text: {10}}) as cache: ...``. ``stats`` counts
    ``{"encode": [hits, misses], "prefix": [hits, misses]}`` (bypassed calls are not counted).
    """

    def __init__(self, layers: Optional[Mapping[TowerLike, Iterable[int]]] = None) -> None:
        self._layers: Dict[int, Tuple[Any, frozenset]] = {
            id(t): (weakref.ref(t), frozenset(int(k) for k in ks)) for t, ks in (layers or {}).items()}
        self._entries: Dict[Tuple[Any, ...], _Entry] = {}
        self._token: Optional[contextvars.Token] = None
        self.stats: Dict[str, list] = {"encode": [0, 0], "prefix": [0, 0]}

    def __enter__(self) -> "PassCache":
        if self._token is not None:
            raise RuntimeError("this PassCache is already active; use one per batch")
        self._token = _ACTIVE.set(self)
        return self

    def __exit__(self, *exc: Any) -> None:
        _ACTIVE.reset(self._token)
        self._token = None
        self.clear()

    def __len__(self) -> int:
        return len(self._entries)

    def clear(self) -> None:
        """Drop every stored pass."""
        self._entries.clear()

    def _wanted(self, tower: TowerLike) -> frozenset:
        ref, layers = self._layers.get(id(tower), (None, frozenset()))
        return layers if ref is not None and ref() is tower else frozenset()

    def _entry(self, tower: TowerLike, x: Tensor) -> Optional[_Entry]:
        """The entry of ``(tower, x)`` under the current numerics (created if needed), or None to bypass."""
        if torch.is_grad_enabled() and (x.requires_grad or any(p.requires_grad for p in tower.parameters())):
            return None
        key = (id(tower), id(x), _numerics(x.device))
        versions = (x._version, _weights_version(tower))
        entry = self._entries.get(key)
        if entry is not None and entry.tower() is tower and entry.x() is x and entry.versions == versions:
            return entry
        entries = self._entries
        entry = _Entry(tower=weakref.ref(tower), x=weakref.ref(x, lambda _, k=key: entries.pop(k, None)),
                       versions=versions)
        entries[key] = entry
        return entry

    def _run(self, tower: TowerLike, entry: _Entry, x: Tensor, stop: int, keep: frozenset) -> Tensor:
        """The residual stream after ``stop`` blocks, from the deepest fresh stored state at a layer <= ``stop``;
        stores the streams at the layers of ``keep`` it passes."""
        start = max((k for k, s in entry.states.items() if k <= stop and _fresh(s) is not None), default=None)
        h = tower.embed(x) if start is None else entry.states[start][0]
        start = start or 0
        if start == 0 and 0 in keep and 0 not in entry.states:
            entry.states[0] = (h, h._version)
        for cut in sorted(k for k in keep if start < k < stop) + [stop]:
            if cut > start:
                h = _blocks(tower, h, start, cut, x)
                if (cut in keep or cut == stop) and _fresh(entry.states.get(cut)) is None:
                    entry.states[cut] = (h, h._version)
                start = cut
        return h

    def prefix(self, tower: TowerLike, x: Tensor, k: int) -> Tensor:
        """``tower.prefix(x, k)``, shared (module docstring)."""
        entry = self._entry(tower, x)
        if entry is None:
            return _blocks(tower, tower.embed(x), 0, k, x)
        hit = _fresh(entry.states.get(k))
        self.stats["prefix"][0 if hit is not None else 1] += 1
        if hit is not None:
            return hit
        entry.states.pop(k, None)
        h = self._run(tower, entry, x, k, self._wanted(tower))
        entry.states[k] = (h, h._version)
        return h

    def encode(self, tower: TowerLike, x: Tensor) -> Tensor:
        """``tower.encode(x)``, shared; a clean encode also stores the streams at the tower's ``layers``."""
        entry = self._entry(tower, x)
        n = tower.n_layers
        if entry is None:
            return tower.head(_blocks(tower, tower.embed(x), 0, n, x), x)
        hit = _fresh(entry.embedding)
        self.stats["encode"][0 if hit is not None else 1] += 1
        if hit is not None:
            return hit
        keep = self._wanted(tower)
        had_last = _fresh(entry.states.get(n)) is not None
        h = self._run(tower, entry, x, n, keep)
        if n not in keep and not had_last:
            entry.states.pop(n, None)
        emb = tower.head(h, x)
        entry.embedding = (emb, emb._version)
        return emb
