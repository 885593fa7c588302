"""Crash safety and determinism of eval.py (issue 19, items 4-5; docs/guarantees.md).

A run killed (SIGKILL) at chosen writes - mid-write of a batch's records, mid-write of the attribution store,
mid-write of the summary - resumes to the records and summary of an uninterrupted run, with no record lost or
counted twice; a full disk or a permission error is one line, and what was written stays readable and resumes;
two runs under ``--trainer.deterministic true`` write byte-identical records and stores.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from clipib.callbacks.records import FAULT_ENV, _json_lines, iter_attributions, read_records, write_summary

ROOT = Path(__file__).resolve().parent.parent
TINY = str(ROOT / "tests" / "data" / "tiny-clip.json")
N = 7  # pairs; batches of 2 -> 4 batches
METHODS = {"saliency": {}, "nib": {"steps": 2}}
SEEDS = [0, 1]
TIMING = ("pairs_per_s", "peak_mib")
RUN_TIMING = ("stages",)  # the run's time breakdown (issue 20): wall times, not results


def _config(tmp: Path, run: str) -> Path:
    cfg = {
        "trainer": {"default_root_dir": str(tmp / run), "accelerator": "cpu", "devices": 1,
                    "enable_progress_bar": False, "logger": False},
        "model": {"model": TINY, "pretrained": "none", "methods": METHODS, "seeds": SEEDS,
                  "metrics": {"similarity": {}, "pointing_game": {}}},
        "data": {"class_path": "clipib.data.EvalDataModule",
                 "init_args": {"batch_size": 2, "dataset": {"class_path": "clipib.data.sources.synthetic.ShapesDataset",
                                                            "init_args": {"size": N, "seed": 3}}}},
    }
    path = tmp / f"{run}.json"
    path.write_text(json.dumps(cfg))
    return path


def _eval(config: Path, *extra: str, fault: str = "") -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", FAULT_ENV: fault}
    return subprocess.run([sys.executable, str(ROOT / "eval.py"), "test", "-c", str(config), *extra],
                          capture_output=True, text=True, env=env, cwd=ROOT)


def _is_method(entry) -> bool:
    """A method's entry of summary.json (``{value: {"mean", ...}}``), not a run-level key (``skipped``, ...)."""
    return isinstance(entry, dict) and all(isinstance(v, dict) and "mean" in v for v in entry.values())


def _summary(run: Path) -> dict:
    """summary.json without the timing fields."""
    data = json.loads((run / "summary.json").read_text())
    return {m: {k: v for k, v in vals.items() if k not in TIMING} if _is_method(vals) else vals
            for m, vals in data.items() if m not in RUN_TIMING}


def _same_summary(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for method in a:
        if not _is_method(a[method]):
            assert a[method] == b[method], method
            continue
        assert a[method].keys() == b[method].keys()
        for name in a[method]:  # float64 sums taken in another order: equal to rounding
            assert a[method][name] == pytest.approx(b[method][name], rel=1e-12, abs=1e-15, nan_ok=True), (method, name)


def _records(run: Path) -> dict:
    return {(r["key"], r["method"], r["seed"]): r for r in read_records(run)}


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("reference")
    out = _eval(_config(tmp, "run"), "--trainer.deterministic", "true")
    assert out.returncode == 0, out.stderr[-3000:]
    return tmp / "run"


@pytest.mark.slow
def test_killed_at_every_write_kind_resumes_to_the_same_result(tmp_path, reference):
    """SIGKILL mid-write of the 2nd batch's records, then of the 2nd batch's maps, then of the summary; the 4th
    attempt finishes: same records, same maps (each once), same summary as the uninterrupted run."""
    config = _config(tmp_path, "run")
    run = tmp_path / "run"
    torn_lines = 0
    for attempt, fault in enumerate(("record:2:kill", "store:2:kill", "summary:1:kill")):
        out = _eval(config, "--trainer.deterministic", "true", fault=fault)
        assert out.returncode == -9, (fault, out.stderr[-2000:])  # killed by SIGKILL
        tail = (run / "records" / f"rank0-{attempt:03d}.jsonl").read_bytes()
        torn_lines += bool(tail) and not tail.endswith(b"\n")
    assert torn_lines >= 1  # the record kill left a torn last line, which readers must drop
    assert not (run / "summary.json").exists() or json.loads((run / "summary.json").read_text())  # never half
    out = _eval(config, "--trainer.deterministic", "true")
    assert out.returncode == 0, out.stderr[-3000:]
    assert "resumed:" in out.stdout

    got, want = _records(run), _records(reference)
    assert got == want  # bit-identical values (deterministic), none lost
    assert len(read_records(run)) == N * len(METHODS) * len(SEEDS)  # none twice
    first = list(_json_lines(run / "records" / "rank0-000.jsonl"))
    assert first and {r["key"] for r in first} < {k for k, _, _ in got}  # the first attempt finished some
    maps = list(iter_attributions(run))
    idents = [(m["key"], m["method"], m["seed"]) for m in maps]
    assert len(idents) == len(set(idents)) == N * len(METHODS) * len(SEEDS)
    ref_maps = {(m["key"], m["method"], m["seed"]): m for m in iter_attributions(reference)}
    for m in maps:
        ref = ref_maps[(m["key"], m["method"], m["seed"])]
        assert (m["image"] == ref["image"]).all() and (m["text"] == ref["text"]).all()
    _same_summary(_summary(run), _summary(reference))


@pytest.mark.slow
@pytest.mark.parametrize("fault, words", [("record:3:enospc", "No space left on device"),
                                          ("store:2:eacces", "Permission denied")])
def test_disk_full_and_permission_errors_are_one_line_and_resumable(tmp_path, reference, fault, words):
    config = _config(tmp_path, "run")
    out = _eval(config, "--trainer.deterministic", "true", fault=fault)
    assert out.returncode == 1
    errors = [line for line in out.stderr.splitlines() if line.startswith("eval.py: error:")]
    assert len(errors) == 1 and words in errors[0] and "re-run" in errors[0], out.stderr[-2000:]
    assert "Traceback" not in out.stderr
    partial = read_records(tmp_path / "run")  # what was written is readable: the finished batches' records
    assert 0 < len(partial) < N * len(METHODS) * len(SEEDS)
    out = _eval(config, "--trainer.deterministic", "true")
    assert out.returncode == 0, out.stderr[-3000:]
    assert _records(tmp_path / "run") == _records(reference)
    _same_summary(_summary(tmp_path / "run"), _summary(reference))


@pytest.mark.slow
def test_deterministic_runs_are_bit_identical(tmp_path, reference):
    """Two CPU runs with ``--trainer.deterministic true``: records and attribution store equal byte for byte
    (records hold no timing; the summary's timing fields are the only difference)."""
    out = _eval(_config(tmp_path, "again"), "--trainer.deterministic", "true")
    assert out.returncode == 0, out.stderr[-3000:]
    for sub, pattern in (("records", "*.jsonl"), ("attributions", "*.tar")):
        a = sorted((reference / sub).glob(pattern))
        b = sorted((tmp_path / "again" / sub).glob(pattern))
        assert [p.name for p in a] == [p.name for p in b] and a
        for x, y in zip(a, b):
            assert x.read_bytes() == y.read_bytes(), x.name
    assert _summary(tmp_path / "again") == _summary(reference)


def test_torn_last_record_line_is_dropped_even_if_it_parses(tmp_path):
    records = tmp_path / "records"
    records.mkdir()
    whole = json.dumps({"key": "a", "method": "m", "seed": 0, "cos": 0.5}) + "\n"
    torn = json.dumps({"key": "b", "method": "m", "seed": 0, "cos": 0.25})  # complete JSON, no newline yet
    (records / "rank0-000.jsonl").write_bytes((whole + whole[:9] + "\n" + torn).encode())
    assert [r["key"] for r in read_records(tmp_path)] == ["a"]


def test_summary_is_replaced_atomically(tmp_path, monkeypatch):
    write_summary(tmp_path, {"m": {"cos": {"mean": 1.0, "std": 0.0, "n": 1}}}, {})
    before = (tmp_path / "summary.json").read_text()
    monkeypatch.setenv(FAULT_ENV, "summary:1:enospc")
    from clipib.callbacks import records

    monkeypatch.setattr(records, "_fault_counts", {})
    with pytest.raises(OSError, match="No space left"):
        write_summary(tmp_path, {"m": {"cos": {"mean": 2.0, "std": 0.0, "n": 2}}}, {})
    assert (tmp_path / "summary.json").read_text() == before  # the old summary, whole
    assert not list(tmp_path.glob(".*.tmp"))


def test_store_writer_forgets_written_members(tmp_path):
    """tarfile keeps a TarInfo per member written (a leak over millions of pairs): _flush_tar drops them once the
    members are on disk, and the tar stays readable."""
    import numpy as np
    import webdataset as wds

    from clipib.callbacks.records import _flush_tar, read_store

    writer = wds.TarWriter(str(tmp_path / "s.tar"), mtime=0.0)
    for i in range(5):
        writer.write({"__key__": f"m-0-{i}", "json": {"key": str(i), "method": "m", "seed": 0},
                      "image.npy": np.full((4, 4), i, dtype=np.float16)})
        _flush_tar(writer)
        assert writer.tarstream.members == []
    writer.close()
    got = list(read_store(tmp_path / "s.tar"))
    assert [s["key"] for s in got] == [str(i) for i in range(5)] and float(got[3]["image"][0, 0]) == 3.0


@pytest.mark.slow
def test_ddp_resume_with_nothing_left_writes_the_summary(tmp_path, reference):
    """A finished run killed before its summary, resumed on 2 processes: no rank has a pair left (Lightning skips
    every test epoch), yet every rank joins the final sync and the summary is the single-process one."""
    config = _config(tmp_path, "run")
    out = _eval(config, "--trainer.deterministic", "true", fault="summary:1:kill")
    assert out.returncode == -9 and not (tmp_path / "run" / "summary.json").exists()
    ddp = ("--trainer.devices", "2", "--trainer.strategy", "ddp", "--trainer.deterministic", "true")
    out = subprocess.run([sys.executable, str(ROOT / "eval.py"), "test", "-c", str(config), *ddp],
                         capture_output=True, text=True, cwd=ROOT, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert out.returncode == 0, out.stderr[-3000:]
    _same_summary(_summary(tmp_path / "run"), _summary(reference))
    assert _records(tmp_path / "run") == _records(reference)
