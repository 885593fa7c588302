"""TensorBoard views of an evaluation: one run per method, so the dashboards compare methods side by side.

Layout under the TensorBoard logger's folder (``<run>/tensorboard/version_<n>/``, one per attempt)::

    <method>/   one run per method: SCALARS ``running/<value>`` (running means every ``every_n_batches``
                batches, step = pairs done by process 0), ``summary/<value>`` (the final mean, over every
                process and resumed pair), HISTOGRAMS ``values/<value>`` (per-sample values), and the
                method's HPARAMS session (its settings). ``<value>``: the metrics' values and the values the
                matched-vs-mismatched AUROCs read (``AttributionModule.value_names``); a method's own
                diagnostics stay in the records
    .           the logger's own run: the HPARAMS experiment (methods × settings × final metrics), TEXT
                ``summary`` (the summary table, escaped), IMAGES ``roc/<value>`` (matched-vs-mismatched ROC
                curves of every method, plus the clean CLIP cosine's as the baseline), the galleries
                (:class:`~clipib.callbacks.gallery.Gallery`) and SCALARS ``stages/<stage>_s`` /
                ``stages/pairs_per_s`` (where this attempt's time went, ``AttributionModule.stage_times``)

Running means use the records process 0 computes (a shard of the data under DDP); the final scalars,
histograms, ROC curves and hparams use every record of the run (all processes, resumed attempts included),
read back from the run folder after the records callback has closed its files.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, Dict, List, Optional

import numpy as np
import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from torch.utils.tensorboard import SummaryWriter
from torch.utils.tensorboard.summary import hparams

from clipib.api import method_settings
from clipib.callbacks.records import RecordWriter, read_records, record_values, summary_table
from clipib.metrics import mismatch_auroc, mismatch_roc
from clipib.untrusted import markdown_text
from clipib.viz import roc_figure

def _metric_values(record: Dict[str, Any], module: LightningModule) -> Dict[str, float]:
    """The record's metric values (and the values its AUROCs read); method diagnostics stay in the records."""
    values = record_values(record)
    return {k: values[k] for k in module.value_names(record["method"]) if k in values}


def _data_lines(run: Path) -> Dict[str, Any]:
    """The data part of ``summary.json`` (skips by reason, truncated captions) for the summary text, escaped."""
    try:
        saved = json.loads((run / "summary.json").read_text())
    except (OSError, ValueError):
        return {}
    out: Dict[str, Any] = {}
    for part in ("skipped", "truncated_captions"):
        if isinstance(saved.get(part), dict):
            value = {k: v for k, v in saved[part].items() if k != "samples"}
            if isinstance(value.get("by_reason"), dict):
                value["by_reason"] = {markdown_text(str(k)): v for k, v in value["by_reason"].items()}
            out[part] = value
    return out


def run_name(method: str) -> str:
    """A folder name for a method's run."""
    return re.sub(r"[^\w.+-]", "_", method)


def hparam_table(module: LightningModule) -> Dict[str, Dict[str, Any]]:
    """``{method: {setting: value}}`` for TensorBoard's HPARAMS: the registry name, then every constructor
    setting; a column is numeric when every method's value is a number, else text (None as ``"default"``)."""
    rows = {m: {"method": type(a).name, "modality": str(module.modality(m)), **method_settings(a)}
            for m, a in module.methods.items()}
    columns = {c for row in rows.values() for c in row}
    for c in columns:
        present = [row[c] for row in rows.values() if c in row]
        numeric = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in present)
        for row in rows.values():
            if c in row:
                row[c] = float(row[c]) if numeric else ("default" if row[c] is None else str(row[c]))
    return rows


def experiment_summary(table: Dict[str, Dict[str, Any]], metric_tags: List[str]) -> Any:
    """The HPARAMS experiment: every column of ``table`` (``{method: {setting: value}}``) and the metric tags,
    in the given order. ``method`` is marked as differing, so TensorBoard lists (and shows) it first."""
    from tensorboard.plugins.hparams.plugin_data_pb2 import HParamsPluginData

    union = {c: row[c] for row in reversed(list(table.values())) for c in row}
    exp, _, _ = hparams(union, {tag: 0.0 for tag in metric_tags})
    content = HParamsPluginData.FromString(exp.value[0].metadata.plugin_data.content)
    for info in content.experiment.hparam_infos:
        info.differs = info.name == "method"
    exp.value[0].metadata.plugin_data.content = content.SerializeToString()
    return exp


class TensorBoardViews(Callback):
    """Per-method TensorBoard runs, running means, histograms, hparams, the summary text and ROC curves.

    A default of the eval CLI (settings under the top-level ``tensorboard:`` key). Does nothing without a
    TensorBoard logger.

    Args:
        every_n_batches: log running means every this many batches of process 0 (and at the end).
        histograms: log per-sample value histograms.
    """

    def __init__(self, every_n_batches: int = 10, histograms: bool = True) -> None:
        if every_n_batches < 1:
            raise ValueError(f"every_n_batches must be >= 1, got {every_n_batches}")
        self.every_n_batches = every_n_batches
        self.histograms = histograms
        self.writers: Dict[str, SummaryWriter] = {}
        self._sums: Dict[str, Dict[str, List[float]]] = {}  # method -> value -> [sum, count]
        self._pairs: Dict[str, int] = {}
        self._unlogged = False  # batches since the last running point
        self._summary: Optional[Dict[str, Any]] = None
        self._stages: Optional[Dict[str, Any]] = None

    def _log_stages(self, experiment: Any) -> None:
        """``stages/<stage>_s`` (seconds of this attempt) and ``stages/pairs_per_s`` (end to end), step 0."""
        stages = self._stages
        if not stages:
            return
        for name, secs in stages["seconds"].items():
            experiment.add_scalar(f"stages/{name}_s", secs, 0)
        experiment.add_scalar("stages/pairs_per_s", stages["pairs_per_s"], 0)

    @staticmethod
    def _root(trainer: Trainer) -> Optional[Path]:
        logger = trainer.logger
        if logger is None or not hasattr(getattr(logger, "experiment", None), "add_scalar"):
            return None
        return Path(logger.log_dir)

    def on_test_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Open one writer per method in ``<logger folder>/<method>`` (process 0)."""
        root = self._root(trainer) if trainer.global_rank == 0 else None
        if root is None:
            return
        for method in pl_module.methods:
            self.writers[method] = SummaryWriter(str(root / run_name(method)))
            self._sums[method], self._pairs[method] = {}, 0

    def on_test_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        """Accumulate the batch's records; every ``every_n_batches`` batches, log the running means."""
        if not self.writers or not outputs or not outputs.get("records"):
            return
        first_seed = pl_module.seeds[0]
        for r in outputs["records"]:
            sums = self._sums[r["method"]]
            for name, v in _metric_values(r, pl_module).items():
                if v == v:
                    acc = sums.setdefault(name, [0.0, 0])
                    acc[0] += v
                    acc[1] += 1
            self._pairs[r["method"]] += r["seed"] == first_seed
        self._unlogged = True
        if (batch_idx + 1) % self.every_n_batches == 0:
            self._log_running()

    def _log_running(self) -> None:
        self._unlogged = False
        for method, writer in self.writers.items():
            step = self._pairs[method]
            for name, (total, n) in self._sums[method].items():
                writer.add_scalar(f"running/{name}", total / n, step)
            writer.flush()

    def on_test_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """The synced summary (every process calls it) and the last running point."""
        self._summary = pl_module.summary()
        self._stages = pl_module.stage_times() if hasattr(pl_module, "stage_times") else None
        if self.writers and self._unlogged:
            self._log_running()

    def on_test_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Final scalars, histograms, hparams, summary text and ROC curves from every record of the run."""
        if not self.writers:
            return
        run = next((Path(c.run_dir(trainer)) for c in trainer.callbacks if isinstance(c, RecordWriter)),
                   Path(trainer.default_root_dir))
        records = read_records(run)
        summary = self._summary or {}
        experiment = trainer.logger.experiment
        metric_tags = list(dict.fromkeys(f"summary/{v}" for values in summary.values() for v in values))
        table = hparam_table(pl_module)
        experiment._get_file_writer().add_summary(experiment_summary(table, metric_tags))
        for method, writer in self.writers.items():
            mine = [r for r in records if r["method"] == method]
            step = max(self._pairs[method], len({r["key"] for r in mine}))
            for name, stats in summary.get(method, {}).items():
                writer.add_scalar(f"summary/{name}", stats["mean"], step)
            if self.histograms:
                self._histograms(writer, mine, pl_module, step)
            _, ssi, sei = hparams(table[method], {})
            writer._get_file_writer().add_summary(ssi)
            writer._get_file_writer().add_summary(sei)
            writer.close()
        escaped = {markdown_text(m): {markdown_text(k): v for k, v in values.items()} for m, values in summary.items()}
        experiment.add_text("summary", summary_table(escaped, _data_lines(run)), 0)
        self._log_stages(experiment)
        self._roc(experiment, pl_module, records)
        experiment.flush()
        self.writers = {}

    @staticmethod
    def _histograms(writer: SummaryWriter, records: List[Dict[str, Any]], pl_module: LightningModule,
                    step: int) -> None:
        columns: Dict[str, List[float]] = {}
        for r in records:
            for name, v in _metric_values(r, pl_module).items():
                columns.setdefault(name, []).append(v)
        for name, vs in columns.items():
            arr = np.asarray(vs, dtype=np.float64)
            arr = arr[np.isfinite(arr)]
            if arr.size:
                writer.add_histogram(f"values/{name}", arr, step)

    @staticmethod
    def _roc(experiment: Any, pl_module: LightningModule, records: List[Dict[str, Any]]) -> None:
        """One image per configured matched-vs-mismatched value: every method's ROC curve (all seeds pooled)."""
        for value, orientation in (pl_module.hparams.get("mismatch_auroc") or {}).items():
            curves = {}
            for method in pl_module.methods:
                rows = [r for r in records if r["method"] == method and "matched" in r
                        and isinstance(r.get(value), (int, float))]
                scores = torch.tensor([float(r[value]) for r in rows], dtype=torch.float64)
                matched = torch.tensor([bool(r["matched"]) for r in rows])
                ok = torch.isfinite(scores)
                scores, matched = scores[ok], matched[ok]
                if matched.any() and (~matched).any():
                    fpr, tpr = mismatch_roc(scores, matched, orientation)
                    curves[method] = (fpr.tolist(), tpr.tolist(), float(mismatch_auroc(scores, matched, orientation)))
            if curves:
                curves.update(_baseline_curve(records))
                figure = roc_figure(curves, f"matched vs mismatched: {value} ({orientation})")
                experiment.add_image(f"roc/{value}", np.asarray(figure), 0, dataformats="HWC")


def _baseline_curve(records: List[Dict[str, Any]]) -> Dict[str, tuple]:
    """The clean CLIP cosine's ROC (``clip_cos``, ``matched_high``), each pair once: ``{"clip_cosine": curve}``."""
    first: Dict[str, Dict[str, Any]] = {}
    for r in records:
        if isinstance(r.get("clip_cos"), (int, float)) and "matched" in r:
            first.setdefault(r["key"], r)
    scores = torch.tensor([float(r["clip_cos"]) for r in first.values()], dtype=torch.float64)
    matched = torch.tensor([bool(r["matched"]) for r in first.values()], dtype=torch.bool)
    if not (matched.any() and (~matched).any()):
        return {}
    fpr, tpr = mismatch_roc(scores, matched, "matched_high")
    return {"clip_cosine": (fpr.tolist(), tpr.tolist(), float(mismatch_auroc(scores, matched, "matched_high")))}
