"""RecordWriter: per-sample records and maps written as they are computed, resume, and the run summary.

Layout of a run directory (``trainer.default_root_dir`` unless ``out_dir`` is given)::

    records/rank{r}-{attempt}.jsonl      one JSON line per (sample key, method, seed), flushed per batch
    attributions/rank{r}-{attempt}.tar   the maps, a webdataset tar (<id>.json, <id>.image.npy, <id>.text.npy)
    summary.json, summary.md             {method: {metric: {"mean", "std", "n", ...}}}, written by rank 0

The callback writes and reads files only; the numbers come from the LightningModule's public API. Re-running
the same command resumes: at ``setup`` the keys with a record for every (method, seed) are handed to the data
(``datamodule.exclude(keys)``: never decoded again) and their records to the module (``pl_module.resume``,
rank 0), so the summary equals an uninterrupted run's. Each attempt writes new files (a killed run may leave a
truncated last line or tar member; readers skip them). When a key appears in several attempts, the last record
of each (key, method, seed) wins. Nothing read here is ever unpickled (JSON, and ``.npy`` with
``allow_pickle=False``).
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import tarfile
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Set

import numpy as np
import webdataset as wds
from lightning.pytorch import Callback, LightningModule, Trainer
from webdataset.tariterators import group_by_keys, tar_file_iterator


def _json_lines(path: Path) -> Iterator[Dict[str, Any]]:
    """The complete JSON lines of one records file (a line cut short by a kill is skipped)."""
    for line in path.read_text().splitlines() if path.is_file() else []:
        try:
            yield json.loads(line)
        except json.JSONDecodeError:
            continue


NOT_VALUES = frozenset({"key", "method", "seed", "matched", "run_seeds"})
"""Record fields that are not per-sample values."""


def record_values(record: Dict[str, Any]) -> Dict[str, float]:
    """The numeric per-sample values of one record (booleans as 0/1; missing values left out)."""
    return {k: float(v) for k, v in record.items() if k not in NOT_VALUES and isinstance(v, (int, float, bool))}


def read_records(run_dir: Path) -> List[Dict[str, Any]]:
    """All complete records of a run directory, de-duplicated by (key, method, seed), last attempt wins."""
    latest: Dict[tuple, Dict[str, Any]] = {}
    for path in sorted((Path(run_dir) / "records").glob("rank*-*.jsonl"), key=lambda p: (p.stem.split("-")[1], p.stem)):
        for r in _json_lines(path):
            if "skipped" not in r:
                latest[(r["key"], r["method"], r["seed"])] = r
    return list(latest.values())


def read_skips(run_dir: Path) -> List[Dict[str, str]]:
    """Samples the data pipeline skipped, ``[{"key", "reason"}]``, one per key, sorted by key."""
    skips = {r["key"]: r["skipped"] for path in (Path(run_dir) / "records").glob("rank*-*.jsonl")
             for r in _json_lines(path) if "skipped" in r}
    return [{"key": k, "reason": skips[k]} for k in sorted(skips)]


def finished_keys(records: List[Dict[str, Any]], methods: List[str], seeds: List[int]) -> Set[str]:
    """Keys with a record for every (method, seed) the key is evaluated under: every seed of the run, or, for a
    pair of per-run samples (records with ``run_seeds``), the run seeds whose sample holds it."""
    done: Dict[str, set] = {}
    own: Dict[str, List[int]] = {}
    for r in records:
        done.setdefault(r["key"], set()).add((r["method"], r["seed"]))
        if "run_seeds" in r:
            own[r["key"]] = [s for s in r["run_seeds"] if s in seeds]
    return {k for k, got in done.items() if {(m, s) for m in methods for s in own.get(k, seeds)} <= got}


def store_id(method: str, seed: int, key: str) -> str:
    """A tar-safe member id for one map (webdataset splits names at the first dot)."""
    return f"{method}-{seed}-{hashlib.sha1(key.encode()).hexdigest()[:20]}"


def iter_attributions(run_dir: Path) -> Iterator[Dict[str, Any]]:
    """Stream the stored maps: dicts with ``key``, ``method``, ``seed``, ``image`` / ``text`` arrays (or None).

    Each (key, method, seed) is yielded once, and only from an attempt whose record file holds its record
    (records are written after the batch's maps are flushed, so such maps are complete): a killed attempt's
    unrecorded or truncated maps are skipped, and a key recomputed by a resumed run is not yielded twice.
    """
    run_dir, seen = Path(run_dir), set()
    for path in sorted((run_dir / "attributions").glob("rank*-*.tar")):
        recorded = _record_ids(run_dir / "records" / f"{path.stem}.jsonl")
        for sample in read_store(path):
            ident = (sample.get("key"), sample.get("method"), sample.get("seed"))
            if ident in recorded and ident not in seen:
                seen.add(ident)
                yield sample


def _record_ids(path: Path) -> set:
    """(key, method, seed) of every complete record in one records file (empty if it is missing)."""
    return {(r["key"], r["method"], r["seed"]) for r in _json_lines(path) if "skipped" not in r}


def read_store(path: Path) -> Iterator[Dict[str, Any]]:
    """The samples of one attribution tar in order (webdataset's tar reader); a truncated tail ends the stream.

    Only ``json`` and ``*.npy`` members are read, the arrays with ``allow_pickle=False``; other members are ignored.
    """
    try:
        with open(path, "rb") as stream:
            members = ({**member, "__url__": str(path)} for member in tar_file_iterator(stream))
            for raw in group_by_keys(members):
                yield _decode_sample(raw)
    except (tarfile.ReadError, EOFError, OSError, ValueError):
        return  # the member being read was cut short: not yielded


def _decode_sample(raw: Dict[str, Any]) -> Dict[str, Any]:
    sample: Dict[str, Any] = {"image": None, "text": None}
    for name, data in raw.items():
        if name == "json":
            sample.update(json.loads(data))
        elif name.endswith(".npy"):
            sample[name.split(".")[0]] = np.load(io.BytesIO(data), allow_pickle=False)
    return sample


class RecordWriter(Callback):
    """Write records and maps per rank as batches finish; resume finished keys; write the summary.

    A default of the eval CLI (:mod:`clipib.lit.cli`): configs need not list it.

    Args:
        out_dir: run directory (default: ``trainer.default_root_dir``).
        store_maps: also write the attribution store (needed by ROAR retraining).
    """

    def __init__(self, out_dir: Optional[str] = None, store_maps: bool = True) -> None:
        self.out_dir = out_dir
        self.store_maps = store_maps
        self._records = None
        self._tar: Optional[wds.TarWriter] = None
        self.resumed = 0

    def run_dir(self, trainer: Trainer) -> Path:
        """The run directory."""
        return Path(self.out_dir or trainer.default_root_dir)

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        """Resume what earlier attempts finished and open this attempt's files."""
        run = self.run_dir(trainer)
        records = read_records(run)
        done = finished_keys(records, list(pl_module.methods), pl_module.seeds)
        if done:
            if hasattr(pl_module, "check_resumable"):
                pl_module.check_resumable()  # every rank raises alike: no rank is left waiting
            exclude = getattr(trainer.datamodule, "exclude", None)
            if exclude is None:
                raise ValueError(f"{run} holds finished samples, but the datamodule has no exclude(keys) to skip them")
            exclude(done)
            if trainer.global_rank == 0:
                pl_module.resume([r for r in records if r["key"] in done])
        self.resumed = len(done)
        existing = [int(p.stem.split("-")[1]) for p in (run / "records").glob("rank*-*.jsonl")]
        attempt = trainer.strategy.broadcast(max(existing, default=-1) + 1)
        for sub in ("records", "attributions"):
            (run / sub).mkdir(parents=True, exist_ok=True)
        name = f"rank{trainer.global_rank}-{attempt:03d}"
        self._records = open(run / "records" / f"{name}.jsonl", "a")
        if self.store_maps:
            self._tar = wds.TarWriter(str(run / "attributions" / f"{name}.tar"))

    def on_test_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        """Write the batch's maps, then its records and skips (flushed and synced to disk)."""
        if not outputs:
            return
        if self._tar is not None and outputs["batch"] is not None:
            self._write_maps(outputs)
        for r in outputs["records"]:
            self._records.write(json.dumps(r) + "\n")
        for s in outputs.get("skipped", []):
            self._records.write(json.dumps({"key": s["key"], "skipped": s["reason"]}) + "\n")
        self._records.flush()
        os.fsync(self._records.fileno())

    def _write_maps(self, outputs: Dict[str, Any]) -> None:
        for (method, seed), attr in outputs["maps"].items():
            for i, key in enumerate(map_batch(outputs, seed)["key"]):
                sample: Dict[str, Any] = {"__key__": store_id(method, seed, key),
                                          "json": {"key": key, "method": method, "seed": seed}}
                for field in ("image", "text"):
                    value = getattr(attr, field)
                    if value is not None:
                        sample[f"{field}.npy"] = value[i].detach().cpu().numpy().astype(np.float16)
                self._tar.write(sample)
        _flush_tar(self._tar)

    def on_test_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Close this attempt's files; rank 0 writes ``summary.json`` / ``summary.md`` and prints the table."""
        summary = pl_module.summary()  # every process: the metrics sync here
        if self._records is not None:
            self._records.close()
        if self._tar is not None:
            self._tar.close()
        trainer.strategy.barrier()
        if trainer.global_rank == 0:
            run = self.run_dir(trainer)
            skipped = read_skips(run)
            info = getattr(trainer.datamodule, "info", None) or {}
            write_summary(run, summary, {"std_over": std_over(len(pl_module.seeds), info),
                                         "skipped": {"n": len(skipped), "samples": skipped}})
            print((run / "summary.md").read_text())
            if self.resumed:
                print(f"resumed: {self.resumed} pairs were already finished in {run} and were not recomputed")


def map_batch(outputs: Dict[str, Any], seed: int) -> Dict[str, Any]:
    """The pairs the maps of run seed ``seed`` in a ``test_step`` output belong to: the batch, or with per-run
    samples that seed's part of it (``outputs["batches"][seed]``)."""
    return outputs.get("batches", {}).get(seed, outputs["batch"])


def std_over(n_seeds: int, info: Dict[str, Any]) -> str:
    """What the summary's "± std" is, from the number of run seeds and the data's ``info`` (``sample``,
    ``resampled``): the spread over run seeds, each with its own sample, or the methods' noise on fixed pairs."""
    if n_seeds < 2:
        return "samples: the std of the per-pair values (one run seed)"
    if info.get("resampled"):
        return (f"run seeds: the std of the per-seed means over {n_seeds} run seeds; each seed its own sample of "
                f"{info.get('sample')} pairs")
    pairs = f"fixed sample of {info['sample']} pairs" if info.get("sample") else "the same pairs under every seed"
    return f"method noise only: the std of the per-seed means over {n_seeds} run seeds; {pairs}"


def _flush_tar(writer: wds.TarWriter) -> None:
    """Put every member written so far on disk before the batch's records are written.

    ``TarWriter`` writes through a stream-mode tarfile, which holds up to 10 KiB in its block buffer (``buf``
    of CPython's ``tarfile._Stream``): a kill would lose recorded maps. Members are padded to 512-byte blocks,
    so writing the buffer out early leaves a valid tar.
    """
    stream = writer.tarstream.fileobj  # the stream-mode block buffer over our file
    if stream.buf:
        stream.fileobj.write(stream.buf)
        stream.buf = b""
    writer.stream.flush()
    os.fsync(writer.stream.fileno())


def write_summary(run_dir: Path, summary: Dict[str, Dict[str, Dict[str, float]]], extra: Dict[str, Any]) -> None:
    """``summary.json`` and a markdown table ``summary.md`` (mean ± std, n)."""
    (run_dir / "summary.json").write_text(json.dumps({**summary, **extra}, indent=2))
    (run_dir / "summary.md").write_text(summary_table(summary, extra))


def summary_table(summary: Dict[str, Dict[str, Dict[str, float]]], extra: Optional[Dict[str, Any]] = None) -> str:
    """A markdown table, one row per method, one column per metric."""
    columns = sorted({c for values in summary.values() for c in values})
    lines = ["| method | " + " | ".join(columns) + " |", "|---" * (len(columns) + 1) + "|"]
    for method, values in summary.items():
        cells = []
        for c in columns:
            s = values.get(c)
            cells.append("" if s is None else f"{s['mean']:.4g} ± {s['std']:.2g}" if c not in ("pairs_per_s", "peak_mib")
                         else f"{s['mean']:.4g}")
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    n = max((s.get("n", 0) for v in summary.values() for c, s in v.items() if c not in ("pairs_per_s", "peak_mib")),
            default=0)
    meaning = (extra or {}).get("std_over", "over seeds when there are several, else over samples")
    lines.append(f"\nn = {int(n)} pairs per method and seed; ± std: {meaning}.")
    for key, value in (extra or {}).items():
        if key == "std_over":
            continue
        lines.append(f"\n{key}: {json.dumps(value)}")
    return "\n".join(lines) + "\n"
