"""`clipib bench` in a tiny configuration: one method, one batch size; JSON fields, speed-up, agreement."""

import json
import math
import subprocess
import sys

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
