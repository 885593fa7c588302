"""RecordWriter: per-sample records and maps written as they are computed, resume, and the run summary.

Layout of a run directory (``trainer.default_root_dir`` unless ``out_dir`` is given)::

    records/rank{r}-{attempt}.jsonl      one JSON line per (sample key, method, seed), flushed per batch
    attributions/rank{r}-{attempt}.tar   the maps, a webdataset tar (<id>.json, <id>.image.npy, <id>.text.npy)
    summary.json, summary.md             {method: {metric: {"mean", "std", "n", ...}}}, written by rank 0

The callback writes and reads files only; the numbers come from the LightningModule's public API. Re-running
the same command resumes: at ``setup`` the keys with a record for every (method, seed) are handed to the data
(``datamodule.exclude(keys)``: never decoded again) and their records to the module (``pl_module.resume``,
rank 0), so the summary equals an uninterrupted run's. When a key appears in several attempts, the last record
of each (key, method, seed) wins. Nothing read here is ever unpickled (JSON, and ``.npy`` with
``allow_pickle=False``).

Crash safety (docs/guarantees.md): each attempt appends to new files; a record counts only once its line ends
with a newline (a line torn by a kill is dropped, even if it happens to parse); the batch's maps are flushed and
synced before its records are written, and a map counts only once its record does, so a torn last tar member is
never read; ``summary.json`` / ``summary.md`` are replaced atomically (temp file + rename). A process killed at
any instant therefore resumes to the same records and summary, with no record lost or counted twice.
:data:`FAULT_ENV` injects a kill or a write error at a chosen write, for the tests.
"""

from __future__ import annotations

import errno
import hashlib
import io
import json
import os
import signal
import tarfile
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Set

import numpy as np
import webdataset as wds
from lightning.pytorch import Callback, LightningModule, Trainer
from webdataset.tariterators import group_by_keys, tar_file_iterator


def _json_lines(path: Path) -> Iterator[Dict[str, Any]]:
    """The complete JSON lines of one records file, streamed (memory independent of the file's length).

    A line counts only when it ends with a newline: the torn last line a kill can leave is dropped even when
    its beginning parses (the newline is written last). Lines that are not JSON objects are skipped.
    """
    if not path.is_file():
        return
    with open(path, "rb") as f:
        for line in f:
            if not line.endswith(b"\n"):
                return  # torn by a kill (only the last line can be)
            try:
                row = json.loads(line)
            except (json.JSONDecodeError, UnicodeDecodeError):
                continue
            if isinstance(row, dict):
                yield row


FAULT_ENV = "CLIPIB_FAULT"
"""Test hook, read at each write: ``<point>:<n>:<action>`` makes the ``n``-th (1-based) write at ``point``
(``record``: a batch's records; ``store``: a batch's maps; ``summary``: ``summary.json``) write half its bytes,
sync them, then ``kill`` the process (SIGKILL) or raise ``enospc`` / ``eacces`` (as a full disk or a read-only
directory would). Unset in normal runs."""

_fault_counts: Dict[str, int] = {}


def _write(stream: Any, data: bytes, point: str) -> None:
    """``stream.write(data)``, unless :data:`FAULT_ENV` asks for a fault at this write."""
    spec = os.environ.get(FAULT_ENV, "").split(":")
    if len(spec) == 3 and spec[0] == point:
        _fault_counts[point] = _fault_counts.get(point, 0) + 1
        if _fault_counts[point] == int(spec[1]):
            stream.write(data[: len(data) // 2])
            stream.flush()
            os.fsync(stream.fileno())
            if spec[2] == "kill":
                os.kill(os.getpid(), signal.SIGKILL)
            code = {"enospc": errno.ENOSPC, "eacces": errno.EACCES}[spec[2]]
            raise OSError(code, os.strerror(code), getattr(stream, "name", None))
    stream.write(data)


NOT_VALUES = frozenset({"key", "method", "seed", "matched"})
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
    """Keys with a record for every (method, seed) of the run."""
    expected = {(m, s) for m in methods for s in seeds}
    done: Dict[str, set] = {}
    for r in records:
        done.setdefault(r["key"], set()).add((r["method"], r["seed"]))
    return {k for k, got in done.items() if expected <= got}


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
        self._summarised = self._failed = False

    def run_dir(self, trainer: Trainer) -> Path:
        """The run directory."""
        return Path(self.out_dir or trainer.default_root_dir)

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        """Resume what earlier attempts finished and open this attempt's files."""
        run = self.run_dir(trainer)
        self._summarised = self._failed = False
        records = read_records(run)
        done = finished_keys(records, list(pl_module.methods), pl_module.seeds)
        if done:
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
        self._records = open(run / "records" / f"{name}.jsonl", "ab")
        if self.store_maps:
            self._tar = wds.TarWriter(str(run / "attributions" / f"{name}.tar"), mtime=0.0)  # reproducible bytes

    def on_test_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        """Write the batch's maps, then its records and skips (flushed and synced to disk)."""
        if not outputs:
            return
        if self._tar is not None and outputs["batch"] is not None:
            self._write_maps(outputs)
        rows = list(outputs["records"]) + [{"key": s["key"], "skipped": s["reason"]} for s in outputs.get("skipped", [])]
        if rows:
            _write(self._records, "".join(json.dumps(r) + "\n" for r in rows).encode(), "record")
            self._records.flush()
            os.fsync(self._records.fileno())

    def _write_maps(self, outputs: Dict[str, Any]) -> None:
        keys = outputs["batch"]["key"]
        for (method, seed), attr in outputs["maps"].items():
            for i, key in enumerate(keys):
                sample: Dict[str, Any] = {"__key__": store_id(method, seed, key),
                                          "json": {"key": key, "method": method, "seed": seed}}
                for field in ("image", "text"):
                    value = getattr(attr, field)
                    if value is not None:
                        sample[f"{field}.npy"] = value[i].detach().cpu().numpy().astype(np.float16)
                self._tar.write(sample)
        _flush_tar(self._tar)

    def on_exception(self, trainer: Trainer, pl_module: LightningModule, exception: BaseException) -> None:
        """Close this attempt's files so what was written stays readable (a failing close is ignored)."""
        self._failed = True
        for f in (self._records, self._tar):
            try:
                if f is not None:
                    f.close()
            except OSError:
                pass
        self._records = self._tar = None

    def on_test_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Close this attempt's files; rank 0 writes ``summary.json`` / ``summary.md`` and prints the table."""
        self._finish(trainer, pl_module)

    def teardown(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        """Finish a process that had nothing left to compute (Lightning then skips its test epoch).

        A run killed after its last record but before its summary was whole gets the summary on the next attempt,
        on any number of processes: with nothing left every rank skips the epoch, and all of them sync here.
        """
        if stage == "test" and not self._summarised and not self._failed:
            pl_module.to(trainer.strategy.root_device)  # the strategy's teardown moved it to the CPU
            self._finish(trainer, pl_module)

    def _finish(self, trainer: Trainer, pl_module: LightningModule) -> None:
        summary = pl_module.summary()  # every process: the metrics sync here
        if self._records is not None:
            self._records.close()
        if self._tar is not None:
            self._tar.close()
        self._records = self._tar = None
        self._summarised = True
        trainer.strategy.barrier()
        if trainer.global_rank == 0:
            run = self.run_dir(trainer)
            skipped = read_skips(run)
            write_summary(run, summary, {"skipped": {"n": len(skipped), "samples": skipped}})
            print((run / "summary.md").read_text())
            if self.resumed:
                print(f"resumed: {self.resumed} pairs were already finished in {run} and were not recomputed")


def _flush_tar(writer: wds.TarWriter) -> None:
    """Put every member written so far on disk before the batch's records are written.

    ``TarWriter`` writes through a stream-mode tarfile, which holds up to 10 KiB in its block buffer (``buf``
    of CPython's ``tarfile._Stream``): a kill would lose recorded maps. Members are padded to 512-byte blocks,
    so writing the buffer out early leaves a valid tar.
    """
    stream = writer.tarstream.fileobj  # the stream-mode block buffer over our file
    if stream.buf:
        buf, stream.buf = stream.buf, b""
        _write(stream.fileobj, buf, "store")
    writer.stream.flush()
    os.fsync(writer.stream.fileno())
    writer.tarstream.members.clear()  # tarfile keeps a TarInfo per member written: ~1 KiB a pair, a leak at scale


def write_summary(run_dir: Path, summary: Dict[str, Dict[str, Dict[str, float]]], extra: Dict[str, Any]) -> None:
    """``summary.json`` and a markdown table ``summary.md`` (mean ± std, n), each replaced atomically."""
    _replace(run_dir / "summary.json", json.dumps({**summary, **extra}, indent=2), "summary")
    _replace(run_dir / "summary.md", summary_table(summary, extra), "summary_md")


def _replace(path: Path, text: str, point: str) -> None:
    """Write ``path`` through a synced temp file and a rename: a reader sees the old file or the new, never half."""
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        with open(tmp, "wb") as f:
            _write(f, text.encode(), point)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


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
    lines.append(f"\nn = {int(n)} pairs per method and seed; ± is the std over seeds when there are several, "
                 "else over samples.")
    for key, value in (extra or {}).items():
        lines.append(f"\n{key}: {json.dumps(value)}")
    return "\n".join(lines) + "\n"
