"""RecordWriter: per-sample records and maps written as they are computed, resume, and the run summary.

Layout of a run directory (``trainer.default_root_dir`` unless ``out_dir`` is given)::

    records/rank{r}-{attempt}.jsonl      one JSON line per (sample key, method, seed), flushed per batch
    attributions/rank{r}-{attempt}.tar   the maps (webdataset tar: <id>.json, <id>.image.npy, <id>.text.npy)
    summary.json, summary.md             {method: {metric: {"mean", "std", "n", ...}}}, written by rank 0

Re-running the same command resumes: keys with a record for every (method, seed) are skipped and their
records replayed into the metric states, so the summary equals an uninterrupted run's. Each attempt writes
new files (a killed run may leave a truncated last line or tar member; readers skip them). When a key
appears in several attempts, the last record of each (key, method, seed) wins.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import tarfile
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional

import numpy as np
from lightning.pytorch import Callback, LightningModule, Trainer



def _json_lines(path: Path) -> Iterator[Dict[str, Any]]:
    """The complete JSON lines of one records file (a line cut short by a kill is skipped)."""
    for line in path.read_text().splitlines() if path.is_file() else []:
        try:
            yield json.loads(line)
        except json.JSONDecodeError:
            continue


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


def store_id(method: str, seed: int, key: str) -> str:
    """A tar-safe member id for one map (webdataset splits names at the first dot)."""
    return f"{method}-{seed}-{hashlib.sha1(key.encode()).hexdigest()[:20]}"


def iter_attributions(run_dir: Path) -> Iterator[Dict[str, Any]]:
    """Stream the stored maps: dicts with ``key``, ``method``, ``seed``, ``image`` / ``text`` arrays (or None).

    Each (key, method, seed) is yielded once, and only from an attempt whose record file holds its record
    (records are written after the batch's maps are flushed, so such maps are complete): a killed attempt's
    unrecorded or truncated maps are skipped, and a key recomputed by a resumed run is not yielded twice.
    Arrays are read with ``allow_pickle=False``.
    """
    run_dir, seen = Path(run_dir), set()
    for path in sorted((run_dir / "attributions").glob("rank*-*.tar")):
        recorded = _record_ids(run_dir / "records" / f"{path.stem}.jsonl")
        for sample in _read_store(path):
            ident = (sample.get("key"), sample.get("method"), sample.get("seed"))
            if ident in recorded and ident not in seen:
                seen.add(ident)
                yield sample


def _record_ids(path: Path) -> set:
    """(key, method, seed) of every complete record in one records file (empty if it is missing)."""
    return {(r["key"], r["method"], r["seed"]) for r in _json_lines(path) if "skipped" not in r}


def _read_store(path: Path) -> Iterator[Dict[str, Any]]:
    """The samples of one attribution tar in order; a truncated tail ends the stream quietly."""
    current: Dict[str, Any] = {}
    try:
        with tarfile.open(path) as tar:
            for member in tar:
                stem, _, ext = member.name.partition(".")
                if current and current["_id"] != stem:
                    yield _finish(current)
                    current = {}
                data = tar.extractfile(member).read()
                current["_id"] = stem
                if ext == "json":
                    current.update(json.loads(data))
                else:
                    current[ext.split(".")[0]] = np.load(io.BytesIO(data), allow_pickle=False)
    except (tarfile.ReadError, EOFError, OSError):
        return  # the member being read was cut short: not yielded
    if current:
        yield _finish(current)


def _finish(sample: Dict[str, Any]) -> Dict[str, Any]:
    sample.pop("_id", None)
    sample.setdefault("image", None)
    sample.setdefault("text", None)
    return sample


class RecordWriter(Callback):
    """Write records and maps per rank as batches finish; resume finished keys; write the summary.

    Args:
        out_dir: run directory (default: ``trainer.default_root_dir``).
        store_maps: also write the attribution store (needed by ROAR retraining).
    """

    def __init__(self, out_dir: Optional[str] = None, store_maps: bool = True) -> None:
        self.out_dir = out_dir
        self.store_maps = store_maps
        self._records = None
        self._tar = None

    def run_dir(self, trainer: Trainer) -> Path:
        """The run directory."""
        return Path(self.out_dir or trainer.default_root_dir)

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        run = self.run_dir(trainer)
        records = read_records(run)
        expected = {(m, s) for m in pl_module.methods for s in pl_module.seeds}
        done: Dict[str, set] = {}
        for r in records:
            done.setdefault(r["key"], set()).add((r["method"], r["seed"]))
        pl_module.finished_keys = {k for k, got in done.items() if expected <= got}
        if trainer.global_rank == 0:
            pl_module.replay([r for r in records if r["key"] in pl_module.finished_keys])
        existing = [int(p.stem.split("-")[1]) for p in (run / "records").glob("rank*-*.jsonl")]
        attempt = trainer.strategy.broadcast(max(existing, default=-1) + 1)
        for sub in ("records", "attributions"):
            (run / sub).mkdir(parents=True, exist_ok=True)
        name = f"rank{trainer.global_rank}-{attempt:03d}"
        self._records = open(run / "records" / f"{name}.jsonl", "a")
        if self.store_maps:
            self._tar = tarfile.open(run / "attributions" / f"{name}.tar", "w")
        self.resumed = len(pl_module.finished_keys)

    def on_test_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
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
        keys = outputs["batch"]["key"]
        for (method, seed), attr in outputs["maps"].items():
            for i, key in enumerate(keys):
                sid = store_id(method, seed, key)
                self._add(f"{sid}.json", json.dumps({"key": key, "method": method, "seed": seed}).encode())
                for field in ("image", "text"):
                    value = getattr(attr, field)
                    if value is not None:
                        buf = io.BytesIO()
                        np.save(buf, value[i].detach().cpu().numpy().astype(np.float16), allow_pickle=False)
                        self._add(f"{sid}.{field}.npy", buf.getvalue())
        self._tar.fileobj.flush()

    def _add(self, name: str, data: bytes) -> None:
        info = tarfile.TarInfo(name)
        info.size = len(data)
        self._tar.addfile(info, io.BytesIO(data))

    def on_test_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        for handle in (self._records, self._tar):
            if handle is not None:
                handle.close()
        trainer.strategy.barrier()
        if trainer.global_rank == 0:
            run = self.run_dir(trainer)
            skipped = read_skips(run)
            summary = {m: dict(v) for m, v in pl_module.final_summary.items()}
            for method, values in pl_module.auroc_summary(read_records(run)).items():
                summary[method].update(values)
            write_summary(run, summary, {"skipped": {"n": len(skipped), "samples": skipped}})
            print((run / "summary.md").read_text())
            if self.resumed:
                print(f"resumed: {self.resumed} pairs were already finished in {run} and were not recomputed")


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
    lines.append(f"\nn = {int(n)} pairs per method and seed; ± is the std over seeds when there are several, "
                 "else over samples.")
    for key, value in (extra or {}).items():
        lines.append(f"\n{key}: {json.dumps(value)}")
    return "\n".join(lines) + "\n"
