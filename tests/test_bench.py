"""`clipib bench` in a tiny configuration: one method, one batch size; JSON fields, speed-up, agreement."""

import json
import math
import subprocess
import sys

import pytest

from clipib.cli import main
from tests.conftest import TINY


def _finite(x) -> bool:
    return isinstance(x, float) and math.isfinite(x)


def test_bench_tiny(tmp_path, capsys):
    out = tmp_path / "bench.json"
    code = main(["bench", "--methods", "m2ib", "--batch-sizes", "2", "--model", TINY, "--threads", "1",
                 "--settings", '{"m2ib": {"steps": 3, "copies": 2}}', "--no-warmup", "--out", str(out)])
    assert code == 0
    result = json.loads(out.read_text())
    assert {"date_utc", "cpu_count", "torch_threads", "device", "load_average_1_5_15"} <= set(result["meta"])
    (row,) = result["rows"]
    assert row["method"] == "m2ib" and row["batch_size"] == 2 and row["modality"] == "both"
    for key in ("pairs_per_s", "s_per_pair", "wall_s", "cpu_s", "peak_mb", "speedup_vs_reference"):
        assert _finite(row[key]) and row[key] > 0, key
    ref = result["reference"]["m2ib"]
    assert _finite(ref["s_per_pair"]) and len(ref["timings"]) == len(ref["timings_frozen"]) == ref["pairs"] == 1
    # the loop is timed with its weights requiring gradients and frozen; speed-ups divide the faster
    assert ref["s_per_pair"] == min(ref["s_per_pair_weight_grads"], ref["s_per_pair_frozen"])
    assert row["speedup_vs_reference"] == ref["s_per_pair"] / row["s_per_pair"]
    (agree,) = ref["agreement"]
    for key in ("rho_image", "rho_text", "rho_image_seed_to_seed", "rho_text_seed_to_seed"):
        assert _finite(agree[key]) and -1 <= agree[key] <= 1, key
    assert agree["rho_image"] > 0.999 and agree["rho_text"] > 0.999  # seed 0 is the reference's own stream
    flops = result["flops"]["m2ib"]
    assert 0 < flops["floor_gflop_per_pair"] <= flops["clipib_gflop_per_pair"] < flops["reference_gflop_per_pair"]
    # frozen weights: no weight gradients, and the backward stops at the bottleneck
    assert flops["clipib_gflop_per_pair"] < flops["reference_frozen_gflop_per_pair"] < flops["reference_gflop_per_pair"]
    assert _finite(flops["clipib"]["batch_2"]["x_floor"]) and flops["clipib"]["batch_2"]["x_floor"] > 1
    assert (tmp_path / "bench.md").read_text().startswith("Model") and "| m2ib |" in capsys.readouterr().out


def test_bench_saves_after_each_method(tmp_path):
    """A run killed later keeps what it measured: the partial result goes out after every method."""
    import clipib
    from clipib.bench.throughput import run_benchmark

    seen = []
    clip = clipib.load_clip(TINY, pretrained=None)
    result = run_benchmark(clip, ["random", "saliency"], [1], reference_pairs=0, warmup=False, flops=False,
                           on_method=lambda partial: seen.append([r["method"] for r in partial["rows"]]))
    assert seen == [["random"], ["random", "saliency"]]
    assert [r["method"] for r in result["rows"]] == ["random", "saliency"]


def test_bench_budget_skips_what_would_overrun(tmp_path):
    """--max-seconds: a batch size estimated (seconds per pair so far × batch) over the budget is not run, and
    its row says so; the table shows it."""
    out = tmp_path / "bench.json"
    code = main(["bench", "--methods", "random", "--batch-sizes", "1", "2", "100000000", "--model", TINY,
                 "--threads", "1", "--reference-pairs", "0", "--no-flops", "--max-seconds", "30", "--out", str(out)])
    assert code == 0
    rows = json.loads(out.read_text())["rows"]
    assert [r["batch_size"] for r in rows] == [1, 2, 100000000]
    assert all(_finite(r["s_per_pair"]) for r in rows[:2]) and "s_per_pair" not in rows[2]
    assert rows[2]["skipped"].startswith("estimated") and rows[2]["estimated_s"] > 30
    assert "not run: estimated" in (tmp_path / "bench.md").read_text()


def test_bench_bad_settings_one_line(capsys):
    assert main(["bench", "--methods", "m2ib", "--model", TINY, "--settings", "{bad"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("clipib: error:") and "\n" not in err


def test_cuda_checks_run_on_cpu(tiny_clip):
    """The GPU script's checks (benchmarks/gpu_check.sh) run end to end here on the CPU: no syncs to count,
    device == CPU, so the agreements are exact and memory stays flat."""
    from clipib.bench.cuda_checks import run_checks

    result = run_checks(tiny_clip, pairs=2, leak_pairs=4, leak_batch=2)
    assert result["ok"] and all(result["placement"].values())
    agree = result["agreement"]
    assert agree["nib_device_vs_cpu"]["max_abs_diff_image"] == 0 == agree["m2ib_device_vs_cpu"]["max_abs_diff_text"]
    assert -1 <= agree["m2ib_device_noise_vs_official"]["rho_image"] <= 1
    assert [m["pairs"] for m in result["memory"]] == [4, 4]


def test_explain_does_not_import_bench(tmp_path):
    """The benchmark is imported by `clipib bench` only: importing the CLI and explaining a pair leave
    ``clipib.bench`` out of ``sys.modules``; ``clipib bench --help`` still lists the bench options."""
    code = ("import sys; from clipib.cli import main; "
            f"assert main(['explain', '--image', 'src/clipib/assets/sample.png', '--text', 'a red circle', "
            f"'--method', 'random', '--model', {TINY!r}, '--pretrained', 'none', '--out', {str(tmp_path)!r}]) == 0; "
            "print(sorted(m for m in sys.modules if m.startswith('clipib.bench')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().splitlines()[-1] == "[]"
    helped = subprocess.run([sys.executable, "-m", "clipib", "bench", "--help"], capture_output=True, text=True)
    assert helped.returncode == 0 and "--reference-pairs" in helped.stdout, helped.stderr


def test_bench_variants_and_compile_fields(tmp_path, monkeypatch):
    """A --settings entry naming its method runs as a variant beside it, with the reference's speed-up; a
    compile=True variant is warmed up per batch size and reports its compilations (torch.compile stubbed here:
    tests/test_compile.py compiles for real)."""
    monkeypatch.setattr("torch.compile", lambda fn, **kwargs: fn)
    out = tmp_path / "bench.json"
    settings = '{"nib": {"steps": 2}, "nib_c": {"method": "nib", "steps": 2, "compile": true}}'
    code = main(["bench", "--methods", "nib", "nib_c", "--batch-sizes", "2", "--model", TINY, "--threads", "1",
                 "--settings", settings, "--no-warmup", "--no-flops", "--out", str(out)])
    assert code == 0
    result = json.loads(out.read_text())
    eager, compiled = result["rows"]
    assert (eager["method"], compiled["method"]) == ("nib", "nib_c") and set(result["reference"]) == {"nib"}
    assert compiled["speedup_vs_reference"] == result["reference"]["nib"]["s_per_pair"] / compiled["s_per_pair"]
    assert "compile_s" not in eager and compiled["compile_s"] > 0
    assert compiled["compile_graphs"] >= 0 and compiled["recompiles_timed"] == 0
    assert {"graphs", "frames"} <= set(result["meta"]["compile_counts"])
    assert "| nib_c |" in (tmp_path / "bench.md").read_text()
    assert main(["bench", "--methods", "nope", "--model", TINY, "--settings", '{"nope": {"method": "x"}}']) == 2


def test_pipeline_comparison(tmp_path):
    """The run's s/pair against the isolated methods' sum (× seeds), per-stage s/pair; bad input: one line."""
    from clipib.bench.pipeline import compare, main as pipeline_main

    secs = {"data_wait": 1.0, "clean": 0.5, "attribute/a": 4.0, "attribute/b": 2.0, "metrics/a": 0.5,
            "metrics/b": 0.5, "write": 1.0, "other": 0.5, "total": 10.0}
    summary = {"a": {"pairs_per_s": {"mean": 1.0, "n": 8.0}}, "b": {"pairs_per_s": {"mean": 2.0, "n": 8.0}},
               "skipped": {"n": 0}, "stages": {"seconds": secs, "pairs": 4.0, "pairs_per_s": 0.4}}
    bench = {"meta": {}, "rows": [{"method": "a", "batch_size": 4, "s_per_pair": 0.5},
                                  {"method": "b", "batch_size": 4, "s_per_pair": 0.25},
                                  {"method": "b", "batch_size": 8, "skipped": "estimated"}]}
    result = compare(summary, bench, batch_size=4)
    assert result["isolated"]["a"]["seeds"] == 2 and result["isolated_sum_s_per_pair"] == (0.5 + 0.25) * 2
    assert result["run_s_per_pair"] == 2.5 and result["ratio"] == 2.5 / 1.5
    assert result["stages_s_per_pair"]["attribute/a"] == 1.0 and result["isolated"]["a"]["in_run_s_per_pair"] == 1.0
    with pytest.raises(ValueError, match="no timed bench row for 'a' at batch 8"):
        compare(summary, bench, batch_size=8)
    with pytest.raises(ValueError, match="no 'stages'"):
        compare({"a": summary["a"]}, bench)
    (tmp_path / "s.json").write_text(json.dumps(summary))
    (tmp_path / "b.json").write_text(json.dumps(bench))
    pipeline_main(["--summary", str(tmp_path / "s.json"), "--bench", str(tmp_path / "b.json"),
                   "--out", str(tmp_path / "p.json")])
    assert "misses the target" in (tmp_path / "p.md").read_text()
