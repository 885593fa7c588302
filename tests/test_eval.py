"""eval.py end to end: records, summary, resume, DDP on 2 CPU processes, webdataset skips, TensorBoard."""

import io
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import webdataset as wds
from PIL import Image

from clipib.callbacks.records import DATA_KEYS, FAULT_ENV, _json_lines, iter_attributions, read_records

ROOT = Path(__file__).resolve().parent.parent
TINY = str(ROOT / "tests" / "data" / "tiny-clip.json")
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def _png(path: Path, seed: int) -> None:
    Image.fromarray((np.random.default_rng(seed).random((40, 48, 3)) * 255).astype(np.uint8)).save(path)


def _config(tmp: Path, data: dict, run: str, methods=None, metrics=None) -> Path:
    cfg = {
        # no logger, no RecordWriter: both are defaults of the eval CLI
        "trainer": {"default_root_dir": str(tmp / run), "accelerator": "cpu", "devices": 1,
                    "callbacks": [{"class_path": "clipib.callbacks.gallery.Gallery", "init_args": {"n": 2}}]},
        "model": {"model": TINY, "pretrained": "none",
                  "methods": methods or {"m2ib": {"steps": 2, "copies": 2}, "nib": {"steps": 3}},
                  "seeds": [0, 1], "metrics": metrics or {"similarity": {}}},
        "data": {"class_path": "clipib.data.EvalDataModule", "init_args": {"batch_size": 3, **data}},
        "tensorboard": {"every_n_batches": 1},
    }
    path = tmp / f"{run}.json"
    path.write_text(json.dumps(cfg))
    return path


def _eval(config: Path, *extra: str, check: bool = True) -> subprocess.CompletedProcess:
    out = subprocess.run([sys.executable, str(ROOT / "eval.py"), "test", "-c", str(config), *extra],
                         capture_output=True, text=True, env=ENV, cwd=ROOT)
    if check:
        assert out.returncode == 0, out.stderr[-3000:]
    return out


def _records(run: Path) -> dict:
    return {(r["key"], r["method"], r["seed"]): r for r in read_records(run)}


def _same_records(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        for name, value in a[k].items():
            if isinstance(value, float):
                assert value == pytest.approx(b[k][name], rel=1e-4, abs=1e-6), (k, name)
            else:
                assert value == b[k][name]


@pytest.fixture(scope="module")
def csv_data(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("csv")
    rows = ["caption,file_path"]
    for i in range(7):  # 7: not a multiple of 2 processes x batch 3
        _png(root / f"{i}.png", i)
        rows.append(f"a photo number {i},{i}.png")
    (root / "pairs.csv").write_text("\n".join(rows) + "\n")
    return {"dataset": {"class_path": "clipib.data.sources.tables.CsvDataset",
                        "init_args": {"path": str(root / "pairs.csv")}}}


@pytest.fixture(scope="module")
def baseline(tmp_path_factory, csv_data) -> Path:
    tmp = tmp_path_factory.mktemp("base")
    _eval(_config(tmp, csv_data, "run"))
    return tmp / "run"


def test_outputs(baseline):
    summary = json.loads((baseline / "summary.json").read_text())
    assert set(summary) == {"m2ib", "nib", "skipped", "truncated_captions", "std_over", "stages"}
    assert summary["skipped"] == {"n": 0, "by_reason": {}, "samples": []} and summary["truncated_captions"] == {"n": 0}
    assert summary["std_over"].startswith("method noise only") and "same pairs" in summary["std_over"]
    for method in ("m2ib", "nib"):
        assert summary[method]["cos"]["n"] == 7
        assert summary[method]["pairs_per_s"]["mean"] > 0
    _check_stages(summary)
    assert (baseline / "summary.md").read_text().startswith("| method |")
    assert "methods" in (baseline / "config.yaml").read_text()
    records = _records(baseline)
    assert len(records) == 7 * 2 * 2  # keys x methods x seeds
    maps = list(iter_attributions(baseline))
    assert len(maps) == 7 * 2 * 2 and maps[0]["image"].shape == (32, 32) and maps[0]["text"].shape == (77,)
    assert (baseline / "gallery_m2ib.png").is_file()


def _check_stages(summary: dict) -> None:
    """The per-stage breakdown (issue 20): every stage present, non-negative, adding up to the total."""
    stages = summary["stages"]
    secs = stages["seconds"]
    methods = [m for m in summary if m not in DATA_KEYS]
    assert set(secs) == {"data_wait", "clean", "write", "total", "other",
                         *(f"{s}/{m}" for s in ("attribute", "metrics") for m in methods)}
    assert all(v >= 0 for k, v in secs.items() if k != "other") and secs["other"] >= -1e-9
    assert secs["clean"] > 0 and all(secs[f"attribute/{m}"] > 0 for m in methods)
    assert sum(v for k, v in secs.items() if k != "total") == pytest.approx(secs["total"], rel=1e-9)
    assert sum(stages["share"].values()) == pytest.approx(1.0)
    assert stages["pairs"] == 7 and stages["pairs_per_s"] == pytest.approx(7 / secs["total"])
    for m in methods:  # the per-method rate is the attribute stage's (pairs x seeds over its seconds)
        assert summary[m]["pairs_per_s"]["mean"] == pytest.approx(7 * 2 / secs[f"attribute/{m}"], rel=1e-6)


def _events(run_dir: Path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run_dir), size_guidance={"images": 0, "scalars": 0, "histograms": 0,
                                                           "tensors": 0})
    events.Reload()
    return events


def _hparams(events):
    from tensorboard.plugins.hparams import metadata

    content = events.PluginTagToContent(metadata.PLUGIN_NAME)
    parsed = {}
    if metadata.EXPERIMENT_TAG in content:
        parsed["experiment"] = metadata.parse_experiment_plugin_data(content[metadata.EXPERIMENT_TAG])
    if metadata.SESSION_START_INFO_TAG in content:
        parsed["session"] = metadata.parse_session_start_info_plugin_data(content[metadata.SESSION_START_INFO_TAG])
    return parsed


def test_tensorboard_events(baseline):
    """One run per method (scalars overlay), the hparams table with final metrics, histograms, the summary text,
    running means at several steps, the galleries; no hp_metric placeholder, no internal fields."""
    version = next((baseline / "tensorboard").glob("version_*"))
    assert sorted(p.name for p in version.iterdir() if p.is_dir()) == ["m2ib", "nib"]
    root = _events(version)
    tags = root.Tags()
    assert {"gallery/m2ib", "gallery/nib"} <= set(tags["images"])
    assert "hp_metric" not in tags["scalars"] and not any(t.startswith(("m2ib/", "nib/")) for t in tags["scalars"])
    assert "summary/text_summary" in tags["tensors"]
    stages = json.loads((baseline / "summary.json").read_text())["stages"]
    for name, secs in stages["seconds"].items():
        assert root.Scalars(f"stages/{name}_s")[-1].value == pytest.approx(secs, rel=1e-5)
    assert root.Scalars("stages/pairs_per_s")[-1].value == pytest.approx(stages["pairs_per_s"], rel=1e-5)
    text = root.Tensors("summary/text_summary")[0].tensor_proto.string_val[0].decode()
    assert text.startswith("| method |") and "| m2ib |" in text and "| nib |" in text
    experiment = _hparams(root)["experiment"]
    columns = {h.name for h in experiment.hparam_infos}
    assert {"method", "steps", "copies", "beta", "seed"} <= columns and not any(c.startswith("_") for c in columns)
    metric_tags = {m.name.tag for m in experiment.metric_infos}
    assert {"summary/cos", "summary/pairs_per_s"} <= metric_tags
    summary = json.loads((baseline / "summary.json").read_text())
    for method, steps in (("m2ib", 2.0), ("nib", 3.0)):
        run = _events(version / method)
        session = _hparams(run)["session"]
        assert session.hparams["method"].string_value == method and session.hparams["steps"].number_value == steps
        scalars = set(run.Tags()["scalars"])
        assert metric_tags <= scalars  # every hparams metric has its value in the method's run
        final = run.Scalars("summary/cos")[-1]
        assert final.value == pytest.approx(summary[method]["cos"]["mean"], rel=1e-5) and final.step == 7
        running = run.Scalars("running/cos")
        assert [e.step for e in running] == [3, 6, 7]  # 7 pairs, batches of 3, logged after every batch
        cos = [r["cos"] for r in read_records(baseline) if r["method"] == method]
        assert running[-1].value == pytest.approx(sum(cos) / len(cos), rel=1e-5)
        hist = run.Histograms("values/cos")[-1].histogram_value
        assert hist.num == 7 * 2 and hist.min == pytest.approx(min(cos), rel=1e-5)  # pairs x seeds


def test_batch_size_and_workers_change_no_record(tmp_path, csv_data, baseline):
    _eval(_config(tmp_path, {**csv_data, "batch_size": 2, "num_workers": 2}, "other"))
    _same_records(_records(tmp_path / "other"), _records(baseline))


def test_two_processes_same_records(tmp_path, csv_data, baseline):
    _eval(_config(tmp_path, csv_data, "ddp"), "--trainer.devices", "2", "--trainer.strategy", "ddp")
    files = list((tmp_path / "ddp" / "records").glob("*.jsonl"))
    assert len(files) == 2
    keys = [json.loads(l)["key"] for f in files for l in f.read_text().splitlines()]
    assert len(keys) == 7 * 4 and len(set(keys)) == 7  # none twice, none missing
    _same_records(_records(tmp_path / "ddp"), _records(baseline))
    a = json.loads((tmp_path / "ddp" / "summary.json").read_text())
    b = json.loads((baseline / "summary.json").read_text())
    assert a["m2ib"]["cos"]["mean"] == pytest.approx(b["m2ib"]["cos"]["mean"], rel=1e-5)


def test_resume_after_kill(tmp_path, csv_data, baseline):
    # killed (SIGKILL) mid-write of the third batch's records: deterministic, unlike polling for lines, which a
    # fast machine outruns (the run finished all 7 pairs before the poller looked once)
    config = _config(tmp_path, {**csv_data, "batch_size": 1}, "resume")
    proc = subprocess.run([sys.executable, str(ROOT / "eval.py"), "test", "-c", str(config)],
                          env={**ENV, FAULT_ENV: "record:3:kill"}, cwd=ROOT,
                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=240)
    assert proc.returncode == -signal.SIGKILL
    records = tmp_path / "resume" / "records"
    # two pairs complete, the third's write torn halfway: some of its records landed, the torn last line is dropped
    done = {r["key"] for p in records.glob("*.jsonl") for r in _json_lines(p)}
    assert len(done) == 3
    out = _eval(config)
    assert "resumed:" in out.stdout
    second = records / "rank0-001.jsonl"
    recomputed = {json.loads(l)["key"] for l in second.read_text().splitlines()}
    finished_before = {k for k in done if sum(1 for r in _json_lines(records / "rank0-000.jsonl") if r["key"] == k) == 4}
    assert len(finished_before) == 2 and not (recomputed & finished_before)
    _same_records(_records(tmp_path / "resume"), _records(baseline))
    a = json.loads((tmp_path / "resume" / "summary.json").read_text())
    b = json.loads((baseline / "summary.json").read_text())
    for method in ("m2ib", "nib"):
        assert a[method]["cos"] == pytest.approx(b[method]["cos"], rel=1e-5)
    # the store yields every (key, method, seed) once and complete, although the killed attempt left maps too
    maps = list(iter_attributions(tmp_path / "resume"))
    idents = [(m["key"], m["method"], m["seed"]) for m in maps]
    assert len(idents) == len(set(idents)) == 7 * 2 * 2
    assert all(m["image"] is not None and m["text"] is not None for m in maps)


@pytest.fixture(scope="module")
def sampled_runs(tmp_path_factory, csv_data) -> dict:
    """A deterministic method (saliency) on 3 of the 7 pairs, run seeds 0 and 1: per-run samples and one fixed sample."""
    tmp = tmp_path_factory.mktemp("sampled")
    runs = {}
    for name, resample in (("resampled", True), ("fixed", False)):
        data = json.loads(json.dumps(csv_data))
        data["dataset"]["init_args"]["selection"] = {"sample": 3, "sample_seed": 4, "resample": resample}
        config = _config(tmp, data, name, methods={"saliency": {}})
        _eval(config)
        runs[name] = (config, tmp / name)
    return runs


def test_resampling_gives_a_deterministic_method_a_spread(sampled_runs):
    """AdaIB App. A.2 draws new pairs each run: the std over run seeds of a deterministic method is > 0 with
    per-run samples, and exactly 0 with one fixed sample; summary.json says which std it reports."""
    resampled = json.loads((sampled_runs["resampled"][1] / "summary.json").read_text())
    fixed = json.loads((sampled_runs["fixed"][1] / "summary.json").read_text())
    assert resampled["saliency"]["cos"]["std"] > 0 and resampled["saliency"]["cos"]["n"] == 3
    assert fixed["saliency"]["cos"]["std"] == 0 and fixed["saliency"]["cos"]["n"] == 3
    assert resampled["std_over"].startswith("run seeds") and "own sample of 3 pairs" in resampled["std_over"]
    assert fixed["std_over"].startswith("method noise only") and "fixed sample of 3" in fixed["std_over"]
    assert "± std: run seeds" in (sampled_runs["resampled"][1] / "summary.md").read_text()
    records = read_records(sampled_runs["resampled"][1])
    per_seed = {s: {r["key"] for r in records if r["seed"] == s} for s in (0, 1)}
    assert all(len(keys) == 3 for keys in per_seed.values()) and per_seed[0] != per_seed[1]
    assert all(r["seed"] in r["run_seeds"] for r in records)  # each pair scored only under its own run seeds
    maps = list(iter_attributions(sampled_runs["resampled"][1]))
    assert sorted((m["key"], m["seed"]) for m in maps) == sorted((r["key"], r["seed"]) for r in records)


@pytest.mark.slow  # a third eval.py run
def test_resampled_run_resumes(tmp_path, sampled_runs):
    """A resampled run cut short (records of the first pairs only, the last one partly) resumes to the same
    records and summary: finished pairs are those with a record for every method under each of *their* seeds."""
    import shutil

    config, full = sampled_runs["resampled"]
    run = tmp_path / "cut"
    shutil.copytree(full, run)
    for stale in ("summary.json", "summary.md", "tensorboard"):
        shutil.rmtree(run / stale, ignore_errors=True) if (run / stale).is_dir() else (run / stale).unlink(missing_ok=True)
    path = next((run / "records").glob("rank0-000.jsonl"))
    lines, first = path.read_text().splitlines(), []
    for n, line in enumerate(lines):  # the first batch (3 pairs, all their records), then half a line of the next
        key = json.loads(line)["key"]
        if key not in first and len(first) == 3:
            break
        first += [] if key in first else [key]
    path.write_text("\n".join(lines[:n]) + "\n" + lines[n][: len(lines[n]) // 2])  # a kill mid-line
    cfg = json.loads(config.read_text())
    cfg["trainer"]["default_root_dir"] = str(run)
    (tmp_path / "cut.json").write_text(json.dumps(cfg))
    out = _eval(tmp_path / "cut.json")
    assert "resumed: 3 pairs" in out.stdout
    _same_records(_records(run), _records(full))
    a, b = (json.loads((r / "summary.json").read_text()) for r in (run, full))
    assert a["saliency"]["cos"] == pytest.approx(b["saliency"]["cos"], rel=1e-6) and a["std_over"] == b["std_over"]


def _jpeg(seed: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray((np.random.default_rng(seed).random((30, 30, 3)) * 255).astype(np.uint8)).save(buf, "JPEG")
    return buf.getvalue()


def test_webdataset_skips_and_ddp(tmp_path):
    shards = tmp_path / "shards"
    shards.mkdir()
    good = _jpeg(0)
    with wds.TarWriter(str(shards / "00000.tar")) as sink:
        for i in range(4):
            sink.write({"__key__": f"ok{i}", "jpg": _jpeg(i), "txt": f"a picture {i}"})
        sink.write({"__key__": "truncated", "jpg": good[: len(good) // 2], "txt": "cut"})
        sink.write({"__key__": "garbage", "jpg": b"not an image at all", "txt": "garbage"})
    with wds.TarWriter(str(shards / "00001.tar")) as sink:
        for i in range(4, 7):
            sink.write({"__key__": f"ok{i}", "jpg": _jpeg(i), "txt": f"a picture {i}"})
        sink.write({"__key__": "nocaption", "jpg": _jpeg(9)})
        sink.write({"__key__": "latin1", "jpg": _jpeg(10), "txt": "caf\xe9".encode("latin-1")})
    data = {"dataset": {"class_path": "clipib.data.sources.webdataset.ShardDataset",
                        "init_args": {"shards": str(shards / "{00000..00001}.tar")}}}
    methods = {"nib": {"steps": 2}}
    _eval(_config(tmp_path, data, "single", methods=methods))
    _eval(_config(tmp_path, data, "ddp", methods=methods), "--trainer.devices", "2", "--trainer.strategy", "ddp")
    for run in ("single", "ddp"):
        summary = json.loads((tmp_path / run / "summary.json").read_text())
        assert summary["skipped"]["n"] == 4, summary["skipped"]
        assert summary["nib"]["cos"]["n"] == 7
    _same_records(_records(tmp_path / "ddp"), _records(tmp_path / "single"))


def test_shipped_demo_config_runs(tmp_path):
    """configs/eval/demo.yaml (the `make demo` job) on the shipped model, shrunk to a few pairs."""
    run = tmp_path / "demo"
    _eval(ROOT / "configs" / "eval" / "demo.yaml", "--data.dataset.size", "4", "--data.batch_size", "2",
          "--trainer.default_root_dir", str(run))
    summary = json.loads((run / "summary.json").read_text())
    assert {"m2ib", "nib", "adaib", "grad_cam", "saliency"} <= set(summary)
    for method in ("m2ib", "nib", "adaib"):
        for metric in ("pointing_game", "iou", "topk_hit", "image_drop", "text_drop"):
            assert metric in summary[method], (method, metric)
    assert (run / "gallery_m2ib.png").is_file()
    version = next((run / "tensorboard").glob("version_*"))
    root = _events(version)
    assert {"roc/image_fit", "roc/text_fit", "gallery/adaib"} <= set(root.Tags()["images"])
    assert sorted(p.name for p in version.iterdir() if p.is_dir()) == sorted(summary_methods(summary))
    assert len(_events(version / "m2ib").Scalars("running/iou")) == 2  # 4 pairs, batches of 2


def summary_methods(summary: dict) -> list:
    return [m for m in summary if m not in DATA_KEYS and m != "clip_cosine"]  # clip_cosine: the AUROC baseline row


def test_summary_md_reads_the_stages():
    """summary.md gives the time breakdown as one line, largest stage first; an attempt that computed nothing says so."""
    from clipib.callbacks.records import summary_table

    stages = {"seconds": {"total": 2.0, "b": 0.5, "a": 1.5}, "share": {"a": 0.75, "b": 0.25}, "pairs_per_s": 4.0}
    assert "stages (total 2 s, 4 pairs/s): a 1.5 s (75 %), b 0.5 s (25 %)" in summary_table({}, {"stages": stages})
    idle = {"seconds": {"total": 0.0, "a": 0.0}, "share": {}, "pairs_per_s": 0.0}
    assert "nothing was computed in this attempt" in summary_table({}, {"stages": idle})
