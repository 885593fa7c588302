"""Soak test: stream many generated pairs through ``eval.py`` and record its memory over time (issue 19, item 6).

    PYTHONPATH=src python benchmarks/soak.py --pairs 10000 --out outputs/soak

Runs ``eval.py test`` on the synthetic shapes world (``--pairs`` samples, generated on the fly) with a fast
method on the tiny random-weight model of the test suite (``tests/data/tiny-clip.json``: 32 px, 3 blocks), the
attribution store, records, TensorBoard running means and two metrics switched on, and samples the resident
memory (RSS) of the eval process and its children every ``--every`` seconds. Writes ``<out>/rss.csv``
(``seconds, rss_mib, records``), ``<out>/rss.png`` (the curve) and ``<out>/soak.json`` (the reading: RSS after
warm-up, at the end, its slope over the second half). Not part of CI; a recorded run is in docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import List, Optional, Tuple

import psutil

ROOT = Path(__file__).resolve().parent.parent


def soak_config(out: Path, pairs: int, method: str, batch_size: int) -> Path:
    """The eval config of the soak run (JSON, which the eval CLI reads like YAML)."""
    cfg = {
        "trainer": {"default_root_dir": str(out / "run"), "accelerator": "cpu", "devices": 1,
                    "enable_progress_bar": False},
        "model": {"model": str(ROOT / "tests" / "data" / "tiny-clip.json"), "pretrained": "none",
                  "methods": {method: {}}, "seeds": [0],
                  "metrics": {"similarity": {}, "pointing_game": {}}},
        "data": {"class_path": "clipib.data.EvalDataModule",
                 "init_args": {"batch_size": batch_size, "num_workers": 0,
                               "dataset": {"class_path": "clipib.data.sources.synthetic.ShapesDataset",
                                           "init_args": {"size": pairs, "seed": 7, "split": "test"}}}},
        "tensorboard": {"every_n_batches": 10},
    }
    path = out / "soak.json.cfg"
    path.write_text(json.dumps(cfg))
    return path


def tree_rss(proc: psutil.Process) -> int:
    """Resident bytes of ``proc`` and its live children (data-loader workers)."""
    total = 0
    for p in [proc, *proc.children(recursive=True)]:
        try:
            total += p.memory_info().rss
        except psutil.Error:
            pass
    return total


def count_records(run: Path) -> int:
    """Complete record lines written so far."""
    return sum(p.read_bytes().count(b"\n") for p in (run / "records").glob("*.jsonl")) if (run / "records").exists() else 0


def sample(cmd: List[str], run: Path, every: float, env: dict) -> Tuple[List[Tuple[float, float, int]], int]:
    """Run ``cmd`` and sample ``(seconds, RSS MiB, records)`` every ``every`` s until it exits."""
    start = time.time()
    with open(run.parent / "eval.log", "w") as log:
        proc = subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
        ps, rows = psutil.Process(proc.pid), []
        while proc.poll() is None:
            try:
                rows.append((time.time() - start, tree_rss(ps) / 2**20, count_records(run)))
            except psutil.Error:
                break
            time.sleep(every)
    return rows, proc.wait()


def reading(rows: List[Tuple[float, float, int]], pairs: int) -> dict:
    """RSS after warm-up (10 % of the pairs), at the last sample of the loop, the slope of the loop's second half
    (MiB per 1000 pairs), and the end of the run (summary, TensorBoard histograms: they read every record)."""
    loop = [r for r in rows if r[2] < pairs] or rows
    warm = next((r for r in loop if r[2] >= pairs // 10), loop[0])
    half = [r for r in loop if r[2] >= pairs // 2] or loop[-2:]
    slope = (half[-1][1] - half[0][1]) / max(half[-1][2] - half[0][2], 1) * 1000
    return {"pairs": pairs, "seconds": round(rows[-1][0], 1), "rss_warm_mib": round(warm[1], 1),
            "rss_loop_end_mib": round(loop[-1][1], 1), "rss_max_mib": round(max(r[1] for r in rows), 1),
            "loop_mib_per_1000_pairs_second_half": round(slope, 3)}


def read_csv(path: Path) -> List[Tuple[float, float, int]]:
    """The rows of an ``rss.csv``."""
    lines = path.read_text().splitlines()[1:]
    return [(float(t), float(m), int(n)) for t, m, n in (line.split(",") for line in lines)]


def plot(rows: List[Tuple[float, float, int]], path: Path, title: str,
         compare: Optional[Tuple[str, List[Tuple[float, float, int]]]] = None) -> None:
    """RSS against records written; ``compare`` = (label, rows) of an earlier run drawn dashed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def steady(rs: List[Tuple[float, float, int]]) -> List[Tuple[float, float, int]]:
        """Samples once the model is loaded (the first record written) and before the process exits."""
        peak = max(r[1] for r in rs)
        return [r for r in rs if r[2] > 0 and r[1] > 0.5 * peak]

    fig, ax = plt.subplots(figsize=(7, 3.2), dpi=110)
    shown = steady(rows)
    ax.plot([r[2] for r in shown], [r[1] for r in shown], lw=1.2, label="this run")
    if compare:
        other = steady(compare[1])
        ax.plot([r[2] for r in other], [r[1] for r in other], "--", lw=1.0, label=compare[0])
        ax.legend(fontsize=8, loc="upper left")
        shown = shown + other
    ax.set_xlabel("records written (pairs); the last point is the end of the run (summary, TensorBoard)")
    ax.set_ylabel("RSS of eval.py (MiB)")
    lo, hi = min(r[1] for r in shown), max(r[1] for r in shown)
    ax.set_ylim(lo - 0.1 * (hi - lo) - 5, hi + 0.1 * (hi - lo) + 5)
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)


def main() -> None:
    """Parse arguments, run the soak, write the CSV, the PNG and the reading."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=10000)
    parser.add_argument("--method", default="saliency")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--every", type=float, default=1.0, help="seconds between RSS samples")
    parser.add_argument("--threads", type=int, default=1, help="OMP_NUM_THREADS of the eval process")
    parser.add_argument("--out", type=Path, default=ROOT / "outputs" / "soak")
    parser.add_argument("--compare", type=Path, default=None, help="an earlier rss.csv to draw dashed")
    parser.add_argument("--compare-label", default="earlier run")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    run = args.out / "run"
    if run.exists():
        raise SystemExit(f"{run} exists: pick another --out (a soak must start from scratch, not resume)")
    cfg = soak_config(args.out, args.pairs, args.method, args.batch_size)
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "PYTHONPATH": str(ROOT / "src")}
    rows, rc = sample([sys.executable, str(ROOT / "eval.py"), "test", "-c", str(cfg)], run, args.every, env)
    if rc != 0:
        raise SystemExit(f"eval.py exited with {rc}; see {args.out / 'eval.log'}")
    rows.append((rows[-1][0], rows[-1][1], count_records(run)))
    with open(args.out / "rss.csv", "w") as f:
        f.write("seconds,rss_mib,records\n" + "".join(f"{t:.1f},{m:.1f},{n}\n" for t, m, n in rows))
    result = reading(rows, args.pairs)
    (args.out / "soak.json").write_text(json.dumps(result, indent=2))
    plot(rows, args.out / "rss.png", f"eval.py, {args.method}, tiny model, {args.pairs} generated pairs, "
                                      f"{result['seconds']:.0f} s",
         (args.compare_label, read_csv(args.compare)) if args.compare else None)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
