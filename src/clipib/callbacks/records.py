"""RecordWriter: per-sample records and maps written as they are computed, resume, and the run summary.

Layout of a run directory (``trainer.default_root_dir`` unless ``out_dir`` is given)::

    records/rank{r}-{attempt}.jsonl      one JSON line per (sample key, method, seed), flushed per batch
    attributions/rank{r}-{attempt}.tar   the maps, a webdataset tar (<id>.json, <id>.image.npy, <id>.text.npy)
    summary.json, summary.md             {method: {metric: {"mean", "std", "n", ...}}}, written by rank 0, plus
                                         "skipped" (count, count by reason, the first keys) and
                                         "truncated_captions" (count) of the whole run (:func:`data_summary`)

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


NOT_VALUES = frozenset({"key", "method", "seed", "matched", "caption_truncated", "run_seeds"})
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


MapEntry = Dict[str, tuple]
"""Where one sample's stored maps lie: ``{"image" | "text": (tar path, byte offset, byte size)}``."""


def index_store(run_dir: Path, method: str, seed: int = 0) -> Dict[str, MapEntry]:
    """Index the stored maps of ``method`` / ``seed`` by sample key, without reading any array.

    Member names are :func:`store_id` of (method, seed, key), so only the tar headers are read; a map counts
    only when its attempt's record file holds its record, and the first such attempt wins (the rules of
    :func:`iter_attributions`). Read one entry with :func:`read_map`. Raises ``FileNotFoundError`` when the
    run has no attribution store.
    """
    run_dir = Path(run_dir)
    tars = sorted((run_dir / "attributions").glob("rank*-*.tar"))
    if not tars:
        raise FileNotFoundError(f"{run_dir} holds no attribution store (attributions/rank*-*.tar): run eval.py "
                                "with records.store_maps true there first")
    index: Dict[str, MapEntry] = {}
    for path in tars:
        wanted = {store_id(m, s, k): k for k, m, s in _record_ids(run_dir / "records" / f"{path.stem}.jsonl")
                  if m == method and s == seed}
        found: Dict[str, MapEntry] = {}
        for name, offset, size in _tar_members(path):
            ident, _, field = name.partition(".")
            key = wanted.get(ident)
            if key is not None and key not in index and field in ("image.npy", "text.npy"):
                found.setdefault(key, {})[field.split(".")[0]] = (str(path), offset, size)
        index.update(found)
    return index


def _tar_members(path: Path) -> Iterator[tuple]:
    """``(name, data offset, size)`` of each complete member of a tar (a truncated tail ends the list)."""
    try:
        total = path.stat().st_size
        with tarfile.open(path, "r:") as tar:
            for info in tar:
                if info.isfile() and info.offset_data + info.size <= total:
                    yield info.name, info.offset_data, info.size
    except (tarfile.ReadError, EOFError, OSError):
        return


def read_map(where: tuple) -> np.ndarray:
    """The array at ``(tar path, offset, size)`` of :func:`index_store` (``.npy``, ``allow_pickle=False``)."""
    path, offset, size = where
    with open(path, "rb") as stream:
        stream.seek(offset)
        data = stream.read(size)
    if len(data) != size:
        raise OSError(f"{path}: map at byte {offset} is cut short")
    return np.load(io.BytesIO(data), allow_pickle=False)


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
        stages = pl_module.stage_times() if hasattr(pl_module, "stage_times") else None  # every process too
        if self._records is not None:
            self._records.close()
        if self._tar is not None:
            self._tar.close()
        self._records = self._tar = None
        self._summarised = True
        trainer.strategy.barrier()
        if trainer.global_rank == 0:
            run = self.run_dir(trainer)
            info = getattr(trainer.datamodule, "info", None) or {}
            write_summary(run, summary, {"std_over": std_over(len(pl_module.seeds), info), **data_summary(run),
                                         **({"stages": stages} if stages else {})})
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
        buf, stream.buf = stream.buf, b""
        _write(stream.fileobj, buf, "store")
    writer.stream.flush()
    os.fsync(writer.stream.fileno())
    writer.tarstream.members.clear()  # tarfile keeps a TarInfo per member written: ~1 KiB a pair, a leak at scale


DATA_KEYS = ("std_over", "skipped", "truncated_captions", "stages")
"""The keys of ``summary.json`` that are not method names (what the data did: :func:`data_summary`)."""

SKIPS_LISTED = 1000
"""At most this many skipped samples are listed by key in ``summary.json`` (all are counted; every one is in
the records files, :func:`read_skips`)."""


def data_summary(run_dir: Path) -> Dict[str, Any]:
    """What the data did to a run, for ``summary.json``: ``{"skipped": {"n", "by_reason": {reason name: count},
    "samples": [{"key", "reason"}] (the first :data:`SKIPS_LISTED` by key)}, "truncated_captions": {"n"}}``
    (``n``: distinct samples whose caption was cut to the context; every attempt of the run counted once)."""
    from clipib.data.common import skip_reason

    skipped = read_skips(run_dir)
    by_reason: Dict[str, int] = {}
    for s in skipped:
        name = skip_reason(s["reason"])
        by_reason[name] = by_reason.get(name, 0) + 1
    truncated = {r["key"] for r in read_records(run_dir) if r.get("caption_truncated")}
    return {"skipped": {"n": len(skipped), "by_reason": dict(sorted(by_reason.items())),
                        "samples": skipped[:SKIPS_LISTED]},
            "truncated_captions": {"n": len(truncated)}}


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
    meaning = (extra or {}).get("std_over", "over seeds when there are several, else over samples")
    lines.append(f"\nn = {int(n)} pairs per method and seed; ± std: {meaning}.")
    for key, value in (extra or {}).items():
        if key == "std_over":
            continue
        if key == "stages" and isinstance(value, dict) and "seconds" in value:
            lines.append(_stages_line(value))
            continue
        if isinstance(value, dict) and "samples" in value:  # the per-key list stays in summary.json
            value = {k: v for k, v in value.items() if k != "samples"}
        lines.append(f"\n{key}: {json.dumps(value)}")
    return "\n".join(lines) + "\n"


def _stages_line(stages: Dict[str, Any]) -> str:
    """The run's time breakdown in one line: seconds and share per stage, largest first (all of it is in
    ``summary.json`` → ``stages``)."""
    seconds, share = stages.get("seconds", {}), stages.get("share", {})
    if not seconds.get("total"):
        return "\nstages: nothing was computed in this attempt (every pair was finished already)"
    parts = [f"{k} {v:.3g} s ({100 * share.get(k, 0.0):.0f} %)"
             for k, v in sorted(seconds.items(), key=lambda kv: -kv[1]) if k != "total"]
    rate = stages.get("pairs_per_s")
    head = f"\nstages (total {seconds.get('total', 0.0):.3g} s" + (f", {rate:.3g} pairs/s" if rate else "") + "): "
    return head + ", ".join(parts)
