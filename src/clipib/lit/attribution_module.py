"""AttributionModule: a frozen CLIP and a set of attribution methods, evaluated in Lightning's test loop.

``test_step`` explains each batch with every method and seed (gradients enabled inside the method; the
Trainer must run with ``inference_mode=False``), turns each attribution into per-sample metric values with
the configured scorers, updates summed-state metrics, and returns per-sample records and maps for the
callbacks, which do every disk and image write. Samples already finished in an earlier run of the same
command (``finished_keys``, set by :class:`~clipib.callbacks.records.RecordWriter`) are skipped.

Seeds: a pair's seed is derived from its sample key and the run seed (:func:`sample_seed`), so records do not
depend on batch size, worker count or number of processes.
"""

from __future__ import annotations

import resource
import time
import zlib
from typing import Any, Dict, List, Optional, Sequence, Set

import torch
from lightning.pytorch import LightningModule
from torch import Tensor, nn

from clipib.attribution import METHODS, Attribution, Attributor
from clipib.lit.scorers import SCORERS, Scorer
from clipib.metrics.aggregate import SeedMeanStd, Throughput
from clipib.metrics.mismatch import mismatch_auroc as auroc_kernel
from clipib.models.loading import DEFAULT, load_clip


def sample_seed(key: str, seed: int) -> int:
    """A 31-bit seed for one sample from its key and the run seed (stable across processes and runs)."""
    return zlib.crc32(f"{seed}:{key}".encode()) & 0x7FFFFFFF


class AttributionModule(LightningModule):
    """Evaluate attribution methods on a stream of image-text pairs.

    Args:
        model: model name for :func:`clipib.load_clip`.
        pretrained: weights for :func:`clipib.load_clip`.
        methods: ``{name: settings}`` — a registered method name (or ``{"method": registered_name, ...}`` to
            run one method under several names) and its constructor arguments.
        modality: ``"both"``, ``"image"`` or ``"text"``; methods that cannot do a modality skip it.
        seeds: run seeds; each pair's seed is derived from its key and the run seed. AdaIB reports 42-46.
        metrics: ``{scorer name: settings}`` (see :data:`clipib.lit.scorers.SCORERS`).
        keep_maps: return the maps to the callbacks (gallery, attribution store).
        mismatch_auroc: ``{value: orientation}`` — per method and seed, the AUROC with which a per-pair value
            (a scorer's value or a method scalar such as ``image_fit``) separates matched from mismatched pairs
            (AdaIB App. C; needs ``matched`` in the batch). Orientation: ``matched_high`` | ``matched_low`` |
            ``either``. Reported as ``auroc_<value>``, mean ± std over seeds.
    """

    def __init__(
        self,
        model: str = "clipib-shapes",
        pretrained: Optional[str] = DEFAULT,
        methods: Optional[Dict[str, Dict[str, Any]]] = None,
        modality: str = "both",
        seeds: Sequence[int] = (0,),
        metrics: Optional[Dict[str, Dict[str, Any]]] = None,
        keep_maps: bool = True,
        mismatch_auroc: Optional[Dict[str, str]] = None,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        unknown = [m for m in (metrics or {}) if m not in SCORERS]
        if unknown:
            raise ValueError(f"unknown metrics {unknown}; available: {sorted(SCORERS)}")
        self.method_specs = dict(methods or {"m2ib": {}})
        for name, spec in self.method_specs.items():
            if (spec or {}).get("method", name) not in METHODS:
                raise ValueError(f"unknown method {name!r}; available: {sorted(METHODS)}")
        self.clip = load_clip(model, pretrained=pretrained)
        self.methods: Dict[str, Attributor] = {}
        for name, spec in self.method_specs.items():
            spec = dict(spec or {})
            self.methods[name] = METHODS[spec.pop("method", name)](self.clip, **spec)
        self.scorers: Dict[str, Scorer] = {n: SCORERS[n](**(s or {})) for n, s in (metrics or {}).items()}
        self.seeds = [int(s) for s in seeds]
        self.finished_keys: Set[str] = set()
        self.stats = nn.ModuleDict({
            m: nn.ModuleDict({v: SeedMeanStd(n_seeds=len(self.seeds)) for v in self._values(m)})
            for m in self.methods
        })
        self.speed = nn.ModuleDict({m: Throughput() for m in self.methods})
        self.mismatch_auroc = dict(mismatch_auroc or {})

    def _modalities(self, method: str) -> List[str]:
        wanted = ["image", "text"] if self.hparams.modality == "both" else [self.hparams.modality]
        return [m for m in wanted if m in self.methods[method].modalities]

    def _values(self, method: str) -> List[str]:
        """Names of the per-sample values the scorers produce for ``method``."""
        return [v for s in self.scorers.values() for mod in self._modalities(method) for v in s.names(mod)]

    def _attribute(self, method: str, batch: Dict[str, Any], seed: int) -> Attribution:
        mods = self._modalities(method)
        modality = "both" if len(mods) == 2 else mods[0]
        seeds = [sample_seed(k, seed) for k in batch["key"]]
        with torch.enable_grad():
            return self.methods[method].attribute(batch["image"], batch["ids"], modality=modality, seeds=seeds)

    def _keep(self, batch: Dict[str, Any]) -> Optional[Dict[str, Any]]:
        """The batch without finished samples (None if nothing is left)."""
        keep = [i for i, k in enumerate(batch["key"]) if k not in self.finished_keys]
        batch = {k: v for k, v in batch.items() if k != "skipped"}
        if len(keep) == len(batch["key"]):
            return batch
        if not keep:
            return None
        idx = torch.tensor(keep, device=batch["image"].device)
        return {k: (v[idx] if isinstance(v, Tensor) else [v[i] for i in keep]) if _is_batched(v, batch) else v
                for k, v in batch.items()}

    def test_step(self, batch: Dict[str, Any], batch_idx: int) -> Optional[Dict[str, Any]]:
        """Explain, score and return ``{"records", "maps": {(method, seed): Attribution}, "batch", "skipped"}``.

        ``skipped`` lists the samples the data pipeline could not read (``{"key", "reason"}``).
        """
        skipped = [s for s in batch.get("skipped", []) if s["key"] not in self.finished_keys]
        batch = self._keep(batch) if len(batch["key"]) else None
        if batch is None:
            return {"records": [], "maps": {}, "batch": None, "skipped": skipped}
        records: List[Dict[str, Any]] = []
        maps: Dict[tuple, Attribution] = {}
        for method in self.methods:
            for s_idx, seed in enumerate(self.seeds):
                start = _start_timer(self.device)
                attr = self._attribute(method, batch, seed)
                self.speed[method].update(len(batch["key"]), *_stop_timer(self.device, start))
                values = self._score(method, batch, attr)
                for name, v in values.items():
                    self.stats[method][name].update(v, seed_index=s_idx)
                extra = {**attr.scalars, **({"matched": batch["matched"]} if "matched" in batch else {})}
                records += _records(batch, method, seed, {**values, **extra})
                if self.hparams.keep_maps:
                    maps[(method, seed)] = attr
        return {"records": records, "maps": maps, "batch": batch, "skipped": skipped}

    def _score(self, method: str, batch: Dict[str, Any], attr: Attribution) -> Dict[str, Tensor]:
        out: Dict[str, Tensor] = {}
        for scorer in self.scorers.values():
            for mod in self._modalities(method):
                out.update(scorer(self.clip, batch, attr, mod))
        return out

    def replay(self, records: List[Dict[str, Any]]) -> None:
        """Feed records of an earlier, interrupted run into the metric states (rank 0 only)."""
        for r in records:
            if r["method"] not in self.stats or r["seed"] not in self.seeds:
                continue
            s_idx = self.seeds.index(r["seed"])
            for name, metric in self.stats[r["method"]].items():
                if name in r:
                    metric.update(torch.tensor([float("nan") if r[name] is None else r[name]]), seed_index=s_idx)

    def summary(self) -> Dict[str, Dict[str, Dict[str, float]]]:
        """``{method: {value: {"mean", "std", "n", ...}}}`` synced over processes."""
        out: Dict[str, Dict[str, Dict[str, float]]] = {}
        for method, values in self.stats.items():
            out[method] = {name: {k: float(v) for k, v in m.compute().items()} for name, m in values.items()}
            speed = self.speed[method].compute()
            out[method]["pairs_per_s"] = {"mean": float(speed["pairs_per_s"]), "std": 0.0, "n": float(speed["pairs"])}
            out[method]["peak_mib"] = {"mean": float(speed["peak_mib"]), "std": 0.0, "n": float(speed["pairs"])}
        return out

    def auroc_summary(self, records: List[Dict[str, Any]]) -> Dict[str, Dict[str, Dict[str, float]]]:
        """Matched-vs-mismatched AUROC per method and configured value, mean ± std over seeds, from the
        complete records of all processes (computed once, by rank 0, from the run's record files)."""
        out: Dict[str, Dict[str, Dict[str, float]]] = {}
        for method in self.methods:
            for value, orientation in self.mismatch_auroc.items():
                per_seed = []
                for seed in self.seeds:
                    rows = [r for r in records if r["method"] == method and r["seed"] == seed
                            and r.get(value) is not None and "matched" in r]
                    flags = torch.tensor([bool(r["matched"]) for r in rows])
                    if len(rows) and flags.any() and not flags.all():
                        scores = torch.tensor([float(r[value]) for r in rows], dtype=torch.float64)
                        per_seed.append(float(auroc_kernel(scores, flags, orientation)))
                if per_seed:
                    std = float(torch.tensor(per_seed).std()) if len(per_seed) > 1 else 0.0
                    out.setdefault(method, {})[f"auroc_{value}"] = {
                        "mean": sum(per_seed) / len(per_seed), "std": std, "n": float(len(rows))}
        return out

    def on_test_epoch_end(self) -> None:
        """Log every metric mean as a scalar."""
        self.final_summary = self.summary()
        for method, values in self.final_summary.items():
            for name, stats in values.items():
                self.log(f"{method}/{name}", stats["mean"], rank_zero_only=True, sync_dist=False)


def _start_timer(device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    return time.perf_counter()


def _stop_timer(device: torch.device, start: float) -> tuple:
    """``(seconds, peak MiB)``: CUDA peak allocated for the timed call, else the process's peak RSS so far."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        return time.perf_counter() - start, torch.cuda.max_memory_allocated(device) / 2**20
    return time.perf_counter() - start, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _is_batched(value: Any, batch: Dict[str, Any]) -> bool:
    n = len(batch["key"])
    return (isinstance(value, Tensor) and value.ndim > 0 and value.shape[0] == n) or (
        isinstance(value, list) and len(value) == n)


def _records(batch: Dict[str, Any], method: str, seed: int, values: Dict[str, Tensor]) -> List[Dict[str, Any]]:
    rows = []
    for i, key in enumerate(batch["key"]):
        row: Dict[str, Any] = {"key": key, "method": method, "seed": seed}
        for name, v in values.items():
            x = float(v[i])
            if v.dtype == torch.bool:
                row[name] = bool(x)
                continue
            row[name] = x if x == x else None  # NaN -> null
        rows.append(row)
    return rows
