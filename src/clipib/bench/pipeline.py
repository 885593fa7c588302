"""An eval run end to end against the sum of its methods timed alone (issue 20, target 4).

Reads an eval run's ``summary.json`` (its ``stages``: :meth:`clipib.lit.attribution_module.AttributionModule.
stage_times`) and a ``clipib bench`` JSON of the same methods (same names, settings and model) at the run's
batch size, measured back to back on the same machine. The run's seconds per pair (wall time of the test loop,
data wait and writing included, divided by its pairs) is compared with the sum over methods of the isolated
seconds per pair (× the run's seeds); the target is a ratio ≤ 1.10. The table also splits the run's time
into its stages, per pair. ``benchmarks/cpu_targets.sh`` runs both and then this::

    python -m clipib.bench.pipeline --summary RUN/summary.json --bench BENCH.json --batch-size 16 --out OUT.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any, Dict, List, Optional

TARGET_RATIO = 1.10
"""The issue's target: the run's seconds per pair within 10 % of the isolated methods' sum."""


def compare(summary: Dict[str, Any], bench: Dict[str, Any], batch_size: Optional[int] = None) -> Dict[str, Any]:
    """The comparison as a JSON-ready dict (module docstring).

    Raises ValueError when the summary has no ``stages`` or a method of the run has no timed bench row at
    ``batch_size`` (default: the largest batch size the bench timed for it).
    """
    stages = summary.get("stages")
    if not stages:
        raise ValueError("the summary has no 'stages' (an eval run of clipib >= issue 20 writes them)")
    methods = [m for m, v in summary.items()
               if m not in ("stages", "skipped") and isinstance(v, dict) and isinstance(v.get("pairs_per_s"), dict)]
    pairs = stages["pairs"]
    if pairs <= 0:
        raise ValueError("the run attributed no pairs")
    seeds = {m: round(summary[m]["pairs_per_s"]["n"] / pairs) for m in methods}
    isolated: Dict[str, Dict[str, Any]] = {}
    for m in methods:
        rows = [r for r in bench["rows"] if r["method"] == m and "s_per_pair" in r
                and (batch_size is None or r["batch_size"] == batch_size)]
        if not rows:
            raise ValueError(f"no timed bench row for {m!r}" + (f" at batch {batch_size}" if batch_size else ""))
        row = max(rows, key=lambda r: r["batch_size"])
        isolated[m] = {"batch_size": row["batch_size"], "s_per_pair": row["s_per_pair"], "seeds": seeds[m],
                       "in_run_s_per_pair": stages["seconds"].get(f"attribute/{m}", 0.0) / pairs}
    isolated_sum = sum(v["s_per_pair"] * v["seeds"] for v in isolated.values())
    run_s = stages["seconds"]["total"] / pairs
    return {"pairs": pairs, "run_s_per_pair": run_s, "run_pairs_per_s": 1 / run_s if run_s > 0 else 0.0,
            "isolated": isolated, "isolated_sum_s_per_pair": isolated_sum,
            "isolated_sum_pairs_per_s": 1 / isolated_sum if isolated_sum > 0 else 0.0,
            "ratio": run_s / isolated_sum if isolated_sum > 0 else float("inf"), "target_ratio": TARGET_RATIO,
            "stages_s_per_pair": {k: v / pairs for k, v in stages["seconds"].items()},
            "bench_meta": bench.get("meta", {})}


def markdown(result: Dict[str, Any]) -> str:
    """The comparison as markdown."""
    ok = "meets" if result["ratio"] <= result["target_ratio"] else "misses"
    lines: List[str] = [
        f"Run: {result['pairs']:.0f} pairs, {result['run_s_per_pair']:.4g} s/pair ({result['run_pairs_per_s']:.4g} "
        f"pairs/s) end to end; isolated methods: {result['isolated_sum_s_per_pair']:.4g} s/pair summed "
        f"({result['isolated_sum_pairs_per_s']:.4g} pairs/s). Ratio {result['ratio']:.3f} ({ok} the target "
        f"≤ {result['target_ratio']:.2f}).", "",
        "| method | bench batch | isolated s/pair | seeds | in-run attribute s/pair |", "|---|---|---|---|---|"]
    for m, v in result["isolated"].items():
        lines.append(f"| {m} | {v['batch_size']} | {v['s_per_pair']:.4g} | {v['seeds']} | "
                     f"{v['in_run_s_per_pair']:.4g} |")
    lines += ["", "| stage | s/pair |", "|---|---|"]
    lines += [f"| {k} | {v:.4g} |" for k, v in result["stages_s_per_pair"].items()]
    return "\n".join(lines) + "\n"


def main(argv: Optional[List[str]] = None) -> Dict[str, Any]:
    """Command line: compare, write ``--out`` (JSON) and its ``.md``, print the markdown."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--summary", required=True, help="the eval run's summary.json")
    parser.add_argument("--bench", required=True, help="clipib bench JSON of the same methods")
    parser.add_argument("--batch-size", type=int, default=None, help="bench rows at this batch size")
    parser.add_argument("--out", required=True, help="JSON output (.md written next to it)")
    args = parser.parse_args(argv)
    result = compare(json.loads(Path(args.summary).read_text()), json.loads(Path(args.bench).read_text()),
                     args.batch_size)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    table = markdown(result)
    out.with_suffix(".md").write_text(table)
    print(table)
    return result


if __name__ == "__main__":
    main()
