"""AttributionModule: a frozen CLIP and a set of attribution methods, evaluated in Lightning's test loop.

``test_step`` explains each batch with every method and seed (gradients enabled inside the method; the
Trainer must run with ``inference_mode=False``), updates the metrics it owns — one torchmetrics ``Metric`` per
configured metric and method (:data:`clipib.metrics.METRICS`), one matched-vs-mismatched AUROC per configured
value and method, one throughput meter per method — and returns per-sample records and maps for the callbacks,
which do every disk and image write. A resumed run feeds the records of finished samples back with
:meth:`AttributionModule.resume`; :meth:`AttributionModule.summary` gives the synced result.

Seeds: a pair's seed is derived from its sample key and the run seed (:func:`sample_seed`), so records do not
depend on batch size, worker count or number of processes. With per-run samples (``Selection.resample``) a batch
carries ``run_seeds`` (per pair, the run seeds whose sample holds it): each method runs, and is scored, on a pair
only under those seeds, and the pair's records carry the list (the RecordWriter's resume reads it).

Shared work (issue 20): each batch runs inside a :class:`~clipib.models.passes.PassCache`: the clean embeddings
of both towers are computed once (stage ``clean``), together with the residual streams at every layer a
configured method cuts at; every method's ``attribute``, AdaIB's clean relevance and the metrics that encode the
clean pair read them instead of recomputing (identical results, ``tests/test_shared_passes.py``). Where the
time goes is in :meth:`AttributionModule.stage_times` (summary.json ``stages``, TensorBoard ``stages/``).
"""

from __future__ import annotations

import time
import zlib
from typing import Any, Dict, List, Optional, Sequence, Set

import torch
from lightning.pytorch import LightningModule
from torch import Tensor, nn

from clipib.attribution import METHODS, Attribution, Attributor
from clipib.bench.timing import start_timer, stop_timer
from clipib.metrics import METRICS, MismatchAUROC, Throughput, pair_cosine, weighted_terms
from clipib.metrics.stage_times import StageTimes
from clipib.models.loading import DEFAULT, load_clip
from clipib.models.passes import PassCache
from clipib.models.split import Tower

BASELINE = "clip_cosine"
"""Summary row of the method-independent matched-vs-mismatched baseline: the clean pair's CLIP cosine."""
BASELINE_VALUE = "clip_cos"
"""Per-pair record value of that baseline (the clean cosine), and its AUROC ``auroc_clip_cos``."""

Record = Dict[str, Any]
"""One per-sample record: ``{"key", "method", "seed", <value name>: float | bool | None, ...}``."""
Summary = Dict[str, Dict[str, Dict[str, float]]]
"""``{method: {value: {"mean", "std", "n", ...}}}``."""


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
        metrics: ``{metric name: settings}`` (see :data:`clipib.metrics.METRICS`).
        keep_maps: return the maps to the callbacks (gallery, attribution store).
        mismatch_auroc: ``{value: orientation}`` — per method and seed, the AUROC with which a per-pair value
            (a metric's value or a method scalar such as ``image_fit``) separates matched from mismatched pairs
            (AdaIB App. C; needs ``matched`` in the batch). Orientation, fixed in advance: ``matched_high`` |
            ``matched_low`` (or ``either_optimistic`` = max(AUC, 1 - AUC), biased upward). Reported as
            ``auroc_<value>``, mean ± std over seeds. Besides the method's scalars, AdaIB's weighted terms
            ``{m}_f_fit`` and ``{m}_g_kl`` (:func:`clipib.metrics.weighted_terms`) can be named.
        mismatch_baseline: with ``mismatch_auroc`` configured, also record each pair's clean CLIP cosine
            (``clip_cos``) and report its AUROC (``matched_high``, per run seed like the methods', then mean ± std)
            once, as the summary row ``clip_cosine`` (value ``auroc_clip_cos``): the method-independent baseline
            any f- or g-weighted term must beat.
        text_length_multiple: the causal text tower runs on each batch's longest caption rounded up to a
            multiple of this (:func:`clipib.load_clip`): records equal to float rounding; with ``compile=True``
            methods, 16 bounds the text shapes (hence compilations) of a whole run at 5 for a 77-token context.
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
        mismatch_baseline: bool = True,
        text_length_multiple: int = 1,
    ) -> None:
        super().__init__()
        self.save_hyperparameters(logger=False)  # TensorBoard's HPARAMS: callbacks.tensorboard (methods x settings)
        unknown = [m for m in (metrics or {}) if m not in METRICS]
        if unknown:
            raise ValueError(f"unknown metrics {unknown}; available: {sorted(METRICS)}")
        specs = dict(methods or {"m2ib": {}})
        for name, spec in specs.items():
            if (spec or {}).get("method", name) not in METHODS:
                raise ValueError(f"unknown method {name!r}; available: {sorted(METHODS)}")
        if BASELINE in specs:
            raise ValueError(f"{BASELINE!r} is the name of the summary's cosine baseline; name the method otherwise")
        self.clip = load_clip(model, pretrained=pretrained, text_length_multiple=text_length_multiple)
        self.methods: Dict[str, Attributor] = {}
        for name, spec in specs.items():
            spec = dict(spec or {})
            self.methods[name] = METHODS[spec.pop("method", name)](self.clip, **spec)
        self.seeds = [int(s) for s in seeds]
        n = len(self.seeds)
        self.metrics = nn.ModuleDict({
            m: nn.ModuleDict({k: METRICS[k](n_seeds=n, **(s or {})) for k, s in (metrics or {}).items()})
            for m in self.methods
        })
        self.auroc = nn.ModuleDict({
            m: nn.ModuleDict({v: MismatchAUROC(orientation=o, n_seeds=n) for v, o in (mismatch_auroc or {}).items()})
            for m in self.methods
        })
        self.baseline = (MismatchAUROC(orientation="matched_high", n_seeds=n)
                         if mismatch_auroc and mismatch_baseline else None)
        self.speed = nn.ModuleDict({m: Throughput() for m in self.methods})
        self.stages = StageTimes(["data_wait", "clean", *[f"attribute/{m}" for m in self.methods],
                                  *[f"metrics/{m}" for m in self.methods], "write", "total"])
        self._mark: Optional[float] = None  # end of the previous batch (or start of the epoch)
        self._step_end: Optional[float] = None

    def setup(self, stage: str) -> None:
        """Hand the loaded model's preprocess, tokenizer and pair scorer (``use_model``) and the run seeds
        (``use_run_seeds``: per-run samples) to the data."""
        datamodule = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        if datamodule is not None and hasattr(datamodule, "use_run_seeds"):
            datamodule.use_run_seeds(self.seeds)
        if datamodule is not None and hasattr(datamodule, "use_model"):
            datamodule.use_model(self.clip)

    def modality(self, method: str) -> Optional[str]:
        """The modality argument ``method`` runs with (what it can do of the configured ``modality``)."""
        return self.methods[method].modality_for(self.hparams.modality)

    def _modalities(self, method: str) -> List[str]:
        mod = self.modality(method)
        return [] if mod is None else ["image", "text"] if mod == "both" else [mod]

    def value_names(self, method: str) -> List[str]:
        """The per-sample values the metrics record for ``method``, then the values its AUROCs read."""
        mods = self._modalities(method)
        names = [n for m in self.metrics[method].values() for mod in mods for n in m.value_names(mod)]
        return list(dict.fromkeys(names + list(self.auroc[method])))

    def _attribute(self, method: str, batch: Dict[str, Any], seeds: List[int]) -> Attribution:
        with torch.enable_grad():
            return self.methods[method].attribute_batch(batch, self.modality(method), seeds=seeds)

    def shared_layers(self) -> Dict[Tower, Set[int]]:
        """Per tower, the layers the configured methods cut at (the streams the clean pass keeps for them)."""
        layers: Dict[Tower, Set[int]] = {self.clip.image: set(), self.clip.text: set()}
        for name, method in self.methods.items():
            for mod in self._modalities(name):
                tower = self.clip.image if mod == "image" else self.clip.text
                try:
                    layers[tower].add(method.layer_for(tower))
                except (ValueError, TypeError):  # a method without a layer
                    continue
        return layers

    def _clean_passes(self, batch: Dict[str, Any]) -> None:
        """Both towers' clean embeddings of the batch (and the shared prefixes), into the active PassCache."""
        with torch.no_grad():
            self.clip.image.encode(batch["image"])
            self.clip.text.encode(batch["ids"])

    def _timed(self, stage: str, start: float) -> float:
        secs, _ = stop_timer(self.device, start)
        self.stages.update(stage, secs)
        return secs

    def test_step(self, batch: Dict[str, Any], batch_idx: int) -> Dict[str, Any]:
        """Explain, score and return ``{"records", "maps": {(method, seed): Attribution}, "batch", "skipped"}``.

        A record whose caption the data cut to the tokenizer's context carries ``"caption_truncated": true``.

        ``skipped`` lists the samples the data pipeline could not read (``{"key", "reason"}``); ``batch`` is
        None when every sample of the batch was skipped. With per-run samples (``run_seeds`` in the batch) the
        output also has ``"batches": {seed: the pairs of that seed}``, the rows the maps of that seed belong to.
        The batch runs inside one :class:`~clipib.models.passes.PassCache` (module docstring).
        """
        skipped = list(batch.get("skipped", []))
        if not len(batch["key"]):
            self._step_end = time.perf_counter()
            return {"records": [], "maps": {}, "batch": None, "skipped": skipped}
        records: List[Record] = []
        maps: Dict[tuple, Attribution] = {}
        parts = {seed: seed_batch(batch, seed) for seed in self.seeds}
        with PassCache(self.shared_layers()):
            start = start_timer(self.device)
            for part in {id(p): p for p in parts.values() if p is not None}.values():
                self._clean_passes(part)  # per-run samples: each seed's part is its own tensors
            shared = {seed: {} if part is None else self._baseline_values(part, s_idx)
                      for s_idx, (seed, part) in enumerate(parts.items())}
            self._timed("clean", start)
            for method in self.methods:
                if self.modality(method) is None:
                    continue
                for s_idx, seed in enumerate(self.seeds):
                    part = parts[seed]
                    if part is None:  # no pair of this batch is in this run seed's sample
                        continue
                    seeds = [sample_seed(k, seed) for k in part["key"]]
                    start = start_timer(self.device)
                    attr = self._attribute(method, part, seeds)
                    secs, peak = stop_timer(self.device, start)
                    self.speed[method].update(len(part["key"]), secs, peak)
                    self.stages.update(f"attribute/{method}", secs)
                    start = start_timer(self.device)
                    values = self._score(method, part, attr, s_idx, seeds)
                    extra = {**attr.scalars, **weighted_terms(attr.scalars), **shared[seed],
                             **({"matched": part["matched"]} if "matched" in part else {})}
                    self._update_auroc(method, {**values, **extra}, part.get("matched"), s_idx)
                    self._timed(f"metrics/{method}", start)
                    records += _records(part["key"], method, seed, {**values, **extra}, part.get("run_seeds"))
                    if self.hparams.keep_maps:
                        maps[(method, seed)] = attr
        cut = {k for k, c in zip(batch["key"], batch.get("caption_truncated", [])) if bool(c)}
        for r in records:  # marked on the record only when true: the summary counts truncated captions from them
            if r["key"] in cut:
                r["caption_truncated"] = True
        out = {"records": records, "maps": maps, "batch": batch, "skipped": skipped}
        if "run_seeds" in batch:
            out["batches"] = {seed: part for seed, part in parts.items() if part is not None}
        self.stages.add_pairs(len(batch["key"]))
        self._step_end = time.perf_counter()
        return out

    # --- where the time goes: data wait before a batch, the callbacks' writing after it ------------------
    def on_test_epoch_start(self) -> None:
        """Start the clock of the first batch's data wait."""
        self._mark = time.perf_counter()

    def on_test_batch_start(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> None:
        """Stage ``data_wait``: since the previous batch ended (the loader, collation, the device transfer)."""
        if self._mark is not None:
            self.stages.update("data_wait", time.perf_counter() - self._mark)

    def on_test_batch_end(self, outputs: Any, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> None:
        """Stage ``write``: the callbacks' work on this batch (Lightning runs them before this hook); ``total``."""
        now = time.perf_counter()
        if self._step_end is not None:
            self.stages.update("write", now - self._step_end)
        if self._mark is not None:
            self.stages.update("total", now - self._mark)
        self._mark, self._step_end = now, None

    def stage_times(self) -> Dict[str, Any]:
        """Where this attempt's test-loop time went, synced over processes (call it on every process).

        ``{"seconds": {stage: s}, "share": {stage: fraction of total}, "pairs", "pairs_per_s"}``. Stages:
        ``data_wait`` (waiting for the loader before each batch), ``clean`` (the shared clean passes),
        ``attribute/<method>`` (all seeds; the clean passes excluded), ``metrics/<method>`` (metrics and
        AUROC updates), ``write`` (every callback's per-batch work: records, maps, gallery, TensorBoard),
        ``other`` (the loop's own bookkeeping) and ``total`` (first batch's wait to last batch's end; with
        several processes, their sum). ``pairs_per_s`` = pairs / total: the run's end-to-end rate.
        """
        stats = {k: float(v) for k, v in self.stages.compute().items()}
        pairs, rate = stats.pop("pairs"), stats.pop("pairs_per_s")
        total = stats["total"]
        share = {k: (v / total if total > 0 else 0.0) for k, v in stats.items() if k != "total"}
        return {"seconds": stats, "share": share, "pairs": pairs, "pairs_per_s": rate}

    def _baseline_values(self, batch: Dict[str, Any], seed_index: int) -> Dict[str, Tensor]:
        """The clean cosine of each pair of one run seed (``clip_cos``), fed once into that seed's baseline
        AUROC whatever the methods; ``{}`` when the baseline is off or the batch has no ``matched``."""
        if self.baseline is None or "matched" not in batch:
            return {}
        cos = pair_cosine(self.clip, batch["image"], batch["ids"]).detach()
        self.baseline.update(cos.double(), batch["matched"].reshape(-1).to(cos.device), seed_index=seed_index)
        return {BASELINE_VALUE: cos}

    def _score(self, method: str, batch: Dict[str, Any], attr: Attribution, seed_index: int,
               seeds: List[int]) -> Dict[str, Tensor]:
        """Every metric's per-sample values; metrics that re-run the method also get it and the pair seeds."""
        out: Dict[str, Tensor] = {}
        for metric in self.metrics[method].values():
            rerun = {"method": self.methods[method], "seeds": seeds} if metric.needs_method else {}
            for mod in self._modalities(method):
                out.update(metric.update(self.clip, batch, attr, mod, seed_index=seed_index, **rerun))
        return out

    def _update_auroc(self, method: str, values: Dict[str, Tensor], matched: Optional[Tensor], seed_index: int) -> None:
        """Feed each configured value's finite per-pair scores into its AUROC (pairs without one are left out)."""
        if matched is None:
            return
        for name, auroc in self.auroc[method].items():
            if name in values:
                v = values[name].detach().double().reshape(-1)
                ok = torch.isfinite(v)
                auroc.update(v[ok], matched.reshape(-1).to(v.device)[ok], seed_index=seed_index)

    def check_resumable(self) -> None:
        """Raise when a configured metric cannot be rebuilt from records (``AttributionMetric.resumable``)."""
        names = sorted({k for m in self.metrics.values() for k, metric in m.items() if not metric.resumable})
        if names:
            raise ValueError(f"metrics {names} need every pair in one attempt and cannot resume a partly finished run: "
                             "use a fresh run directory (or delete its records/)")

    def resume(self, records: Sequence[Record]) -> None:
        """Feed the records of samples finished by an earlier attempt into the metric states.

        Call it on one process only (the callback uses rank 0), so multi-process sums count each sample once.
        """
        if self.baseline is not None:  # each (pair, run seed) once, from whichever method recorded it
            first: Dict[tuple, Record] = {}
            for r in records:
                if r.get(BASELINE_VALUE) is not None and "matched" in r and r["seed"] in self.seeds:
                    first.setdefault((r["key"], r["seed"]), r)
            for s_idx, seed in enumerate(self.seeds):
                rows = [r for (_, s), r in first.items() if s == seed]
                if rows:
                    self.baseline.update(torch.tensor([float(r[BASELINE_VALUE]) for r in rows], dtype=torch.float64),
                                         torch.tensor([bool(r["matched"]) for r in rows]), seed_index=s_idx)
        for method, s_idx, rows in _grouped(records, list(self.methods), self.seeds):
            names = set(self.value_names(method))
            columns = {n: torch.tensor([_value(r.get(n)) for r in rows], dtype=torch.float64)
                       for n in names if any(n in r for r in rows)}
            for metric in self.metrics[method].values():
                mine = {n: columns[n] for mod in self._modalities(method) for n in metric.value_names(mod) if n in columns}
                if mine:
                    metric.add(mine, seed_index=s_idx)
            if all("matched" in r for r in rows):
                matched = torch.tensor([bool(r["matched"]) for r in rows])
                self._update_auroc(method, columns, matched, s_idx)

    def summary(self) -> Summary:
        """``{method: {value: {"mean", "std", "n", ...}}}`` synced over processes (call it on every process).

        Besides the metric values: ``pairs_per_s`` and ``peak_mib`` (throughput of this run's attributions) and
        ``auroc_<value>`` for each configured matched-vs-mismatched AUROC; with the baseline on, one more row
        ``clip_cosine: {"auroc_clip_cos": ...}`` (the clean cosine's AUROC, method-independent, each pair once).
        """
        out: Summary = {}
        for method in self.methods:
            values: Dict[str, Dict[str, float]] = {}
            for metric in self.metrics[method].values():
                values.update({name: _floats(stats) for name, stats in metric.compute().items()})
            speed = self.speed[method].compute()
            pairs = float(speed["pairs"])
            values["pairs_per_s"] = {"mean": float(speed["pairs_per_s"]), "std": 0.0, "n": pairs}
            values["peak_mib"] = {"mean": float(speed["peak_mib"]), "std": 0.0, "n": pairs}
            for name, auroc in self.auroc[method].items():
                stats = _floats(auroc.compute())
                if stats.get("n", 0) > 0 and stats["mean"] == stats["mean"]:
                    values[f"auroc_{name}"] = stats
            out[method] = values
        if self.baseline is not None:
            stats = _floats(self.baseline.compute())
            if stats.get("n", 0) > 0:
                out[BASELINE] = {f"auroc_{BASELINE_VALUE}": stats}
        return out


def _floats(stats: Dict[str, Any]) -> Dict[str, float]:
    return {k: float(v) for k, v in stats.items()}


def _value(v: Any) -> float:
    return float("nan") if v is None else float(v)


def _grouped(records: Sequence[Record], methods: List[str], seeds: List[int]):
    """``(method, seed index, rows)`` for each (method, seed) of this run that has records."""
    groups: Dict[tuple, List[Record]] = {}
    for r in records:
        if r["method"] in methods and r["seed"] in seeds:
            groups.setdefault((r["method"], seeds.index(r["seed"])), []).append(r)
    for (method, s_idx), rows in groups.items():
        yield method, s_idx, rows


def seed_batch(batch: Dict[str, Any], seed: int) -> Optional[Dict[str, Any]]:
    """The pairs of ``batch`` that run seed ``seed`` evaluates: the batch itself without ``run_seeds``, else the
    pairs whose ``run_seeds`` hold ``seed`` (every per-pair field indexed; None when there are none)."""
    if "run_seeds" not in batch:
        return batch
    keep = [i for i, seeds in enumerate(batch["run_seeds"]) if seed in seeds]
    if not keep:
        return None
    if len(keep) == len(batch["key"]):
        return batch
    n, index = len(batch["key"]), torch.tensor(keep, dtype=torch.long)
    part: Dict[str, Any] = {}
    for name, value in batch.items():
        if isinstance(value, Tensor) and value.ndim and value.shape[0] == n:
            part[name] = value[index.to(value.device)]
        elif isinstance(value, list) and len(value) == n and name != "skipped":
            part[name] = [value[i] for i in keep]
        else:
            part[name] = value
    part["skipped"] = []
    return part


def _records(keys: List[str], method: str, seed: int, values: Dict[str, Tensor],
             run_seeds: Optional[List[List[int]]] = None) -> List[Record]:
    rows = []
    for i, key in enumerate(keys):
        row: Record = {"key": key, "method": method, "seed": seed}
        if run_seeds is not None:
            row["run_seeds"] = list(run_seeds[i])
        for name, v in values.items():
            x = float(v[i])
            if v.dtype == torch.bool:
                row[name] = bool(x)
                continue
            row[name] = x if x == x else None  # NaN -> null
        rows.append(row)
    return rows
