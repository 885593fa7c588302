"""The ROAR grid: a reference run and one fine-tuning run per (method, removal fraction, repeat), run and resumed.

ROAR+ (M2IB Sec. 4.4) is the grid at one fraction (the modality's default) with ``repeats`` (5); the removal
curve (InputIBA App. D.4) is the grid over fractions 0.1 ... 0.9. Layout of ``out``::

    maps/                        the eval run whose stored maps degrade the pairs (made first with maps_config)
    reference/r{r}/              repeat r on undegraded pairs: roar.json (L_o), checkpoints/, config.yaml, TensorBoard
    <method>/f{fraction}/r{r}/   one degraded run: roar.json (L_c, score), ...
    summary.json, summary.md     {method: {"roar_plus_<modality>" | "roar_<modality>@<fraction>": {"mean", "std", "sem", "n"}}}
    curve.png, tensorboard/      the score against the fraction, one line per method (``oracle``, ``random`` anchors)

Resume: a point whose ``roar.json`` exists is never rerun; a point with a ``checkpoints/last.ckpt`` continues
from it (``--ckpt_path last``); eval resumes its own maps. Repeat ``r`` uses seed ``seed + r`` for the
split, the shuffle and the global seed, the same for the reference and every method.

Several processes (a DDP trainer block among the configs, e.g. ``configs/trainer/ddp_cpu.yaml``): Lightning's
launcher starts the other processes at the first fit by re-running the same ``clipib roar`` command line (or
``torchrun`` starts them all), so every process walks the same grid and joins each fit; rank 0 alone writes
each ``roar.json`` (every process waits for it, :class:`~clipib.callbacks.roar.RoarScoreWriter`), the maps and
the sweep's summary, curve and TensorBoard runs.
"""

from __future__ import annotations

import json
import math
import os
import warnings
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Sequence, Tuple

from clipib.callbacks.records import summary_table, write_summary
from clipib.callbacks.roar import metric_name, read_result

CURVE_FRACTIONS = tuple(round(0.1 * i, 1) for i in range(1, 10))
"""InputIBA App. D.4: 10 % ... 90 % removal."""


class SweepError(ValueError):
    """A sweep that cannot run as asked (its message is one line for the command line)."""


def sweep_rank() -> int:
    """This process's global rank in a multi-process sweep (0 when alone): Lightning's, which it reads from
    ``RANK`` / ``LOCAL_RANK`` (torchrun, Lightning's launcher) and sets at each distributed fit."""
    from lightning.pytorch.utilities.rank_zero import rank_zero_only

    return int(getattr(rank_zero_only, "rank", 0) or 0)


def point_dir(out: Path, method: Optional[str], fraction: Optional[float], repeat: int) -> Path:
    """The run directory of one grid point (``method`` None: the reference)."""
    if method is None:
        return out / "reference" / f"r{repeat}"
    return out / method / ("fdefault" if fraction is None else f"f{fraction:g}") / f"r{repeat}"


def grid(methods: Sequence[str], fractions: Sequence[Optional[float]], repeats: int
         ) -> Iterator[Tuple[Optional[str], Optional[float], int]]:
    """The points in run order: per repeat, the reference first, then every (method, fraction)."""
    for r in range(repeats):
        yield None, None, r
        for method in methods:
            for fraction in fractions:
                yield method, fraction, r


def fit_point(configs: Sequence[str], run: Path, overrides: Sequence[str]) -> None:
    """One ``train.py fit`` in this process (resumed from ``run/checkpoints/last.ckpt`` when it exists)."""
    from clipib.lit.cli import train_cli

    args = ["fit"] + [a for c in configs for a in ("-c", str(c))] + ["--trainer.default_root_dir", str(run), *overrides]
    if (run / "checkpoints" / "last.ckpt").is_file():
        args += ["--ckpt_path", "last"]
    with warnings.catch_warnings():  # the sweep's own command line is not the run's: intended
        warnings.filterwarnings("ignore", message="LightningCLI's args parameter")
        train_cli(args)


def make_maps(maps_config: str, maps: Path, extra: Sequence[str] = ()) -> None:
    """Run ``eval.py test`` with ``maps_config`` into ``maps`` (it resumes itself; finished: nothing to do)."""
    if (maps / "summary.json").is_file():
        return
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:  # torchrun: every process would write the one store
        raise SweepError(f"the maps in {maps} are missing: make them before a multi-process sweep, in one process "
                         f"(python eval.py test -c {maps_config} --trainer.default_root_dir {maps})")
    from clipib.lit.cli import eval_cli

    eval_cli(args=["test", "-c", maps_config, "--trainer.default_root_dir", str(maps), *extra])


def run_sweep(configs: Sequence[str], out: Path, methods: Sequence[str], fractions: Sequence[Optional[float]] = (None,),
              repeats: int = 5, seed: int = 0, maps: Optional[Path] = None, maps_config: Optional[str] = None,
              extra: Sequence[str] = ()) -> Dict[str, Dict[str, Dict[str, float]]]:
    """Run (or resume) the grid and write the summary and the curve (rank 0 of a multi-process sweep); returns
    the summary.

    Args:
        configs: the ``train.py`` configs of one run (``-c`` each), e.g. ``configs/roar/shapes.yaml``.
        out: the sweep directory.
        methods: methods with stored maps (``oracle`` and ``random`` are the curve's anchors).
        fractions: removal fractions; ``(None,)``: the modality's default (ROAR+).
        repeats, seed: repeat ``r`` runs with seed ``seed + r``.
        maps: the eval run holding the maps (default ``out/maps``); ``maps_config``: the eval config that makes
            them there first when they are missing.
        extra: further ``train.py`` overrides for every run (e.g. ``--trainer.max_epochs 1``).
    """
    out = Path(out)
    maps = Path(maps) if maps is not None else out / "maps"
    if maps_config is not None:
        make_maps(maps_config, maps)
    if repeats < 1:
        raise SweepError(f"repeats must be >= 1, got {repeats}")
    for method, fraction, r in grid(methods, fractions, repeats):
        run = point_dir(out, method, fraction, r)
        if (run / "roar.json").is_file():
            continue
        overrides = ["--seed_everything", str(seed + r), "--data.init_args.split_seed", str(seed + r),
                     "--data.init_args.maps", str(maps), *extra]
        if method is None:
            overrides += ["--data.init_args.method", "null", "--model.init_args.reference", "null"]
        else:
            overrides += ["--data.init_args.method", method,
                          "--model.init_args.reference", str(point_dir(out, None, None, r))]
            if fraction is not None:
                overrides += ["--data.init_args.fraction", str(fraction)]
        fit_point(configs, run, overrides)
        if not (run / "roar.json").is_file():
            raise RuntimeError(f"the run in {run} ended without a result (interrupted?); run the sweep again to resume")
    summary = collect(out, methods, fractions, repeats)
    if sweep_rank() == 0:
        write_outputs(out, summary, methods, fractions)
    return summary


def _stats(values: List[float]) -> Dict[str, float]:
    n = len(values)
    mean = sum(values) / n
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1)) if n > 1 else 0.0
    return {"mean": mean, "std": std, "sem": std / math.sqrt(n), "n": n}


def collect(out: Path, methods: Sequence[str], fractions: Sequence[Optional[float]], repeats: int
            ) -> Dict[str, Dict[str, Dict[str, float]]]:
    """Mean, std (over repeats, ``ddof=1``), standard error and count of each (method, fraction)'s score, plus
    the validation losses of the reference."""
    summary: Dict[str, Dict[str, Dict[str, float]]] = {}
    ref = [read_result(point_dir(out, None, None, r))["val_loss"] for r in range(repeats)]
    summary["reference"] = {"val_loss": _stats(ref)}
    for method in methods:
        for fraction in fractions:
            results = [read_result(point_dir(out, method, fraction, r)) for r in range(repeats)]
            name = metric_name(results[0].get("modality", "image"), results[0].get("fraction"))
            summary.setdefault(method, {})[name] = _stats([float(x["score"]) for x in results])
    return summary


def write_outputs(out: Path, summary: Dict[str, Dict[str, Dict[str, float]]], methods: Sequence[str],
                  fractions: Sequence[Optional[float]]) -> None:
    """``summary.json`` / ``summary.md``; with several fractions also ``curve.png`` and TensorBoard scalars."""
    extra = {"protocol": "roar_curve" if len(fractions) > 1 else "roar_plus"}
    write_summary(out, summary, extra)
    table = [line for line in summary_table(summary, extra).splitlines() if not line.startswith("n = ")]
    note = "n = repeats per point; ± is the std over repeats (ddof 1); summary.json also has the standard error (sem)."
    (out / "summary.md").write_text("\n".join(table[:len(summary) + 2] + ["", note] + table[len(summary) + 2:]) + "\n")
    if len(fractions) < 2 or any(f is None for f in fractions):
        return
    from torch.utils.tensorboard import SummaryWriter

    from clipib.viz import curve_figure

    xs = [float(f) for f in fractions]  # type: ignore[arg-type]
    curves = {m: [_at(summary[m], f) for f in xs] for m in methods}
    spread = {m: [_at(summary[m], f, "std") for f in xs] for m in methods}  # over repeats; 0 with one repeat
    ends = [v + s * e for m in methods for v, e in zip(curves[m], spread[m]) for s in (-1, 1) if v == v and e == e]
    top, low = max(ends, default=1.0), min(ends, default=0.0)
    y_range = (min(0.0, math.floor(low * 20) / 20), math.ceil(max(top, 1e-6) * 1.1 * 20) / 20)  # 0.05 steps
    repeats = max((int(s.get("n", 1)) for m in methods for s in summary[m].values()), default=1)
    title = "ROAR: (L_c - L_o) / L_o against the removed fraction" + (f" (± std, {repeats} repeats)" if repeats > 1 else "")
    curve_figure(xs, curves, title=title, x_label="removed fraction", y_range=y_range, size=(640, 400),
                 errors=spread).save(out / "curve.png")
    for method, values in curves.items():
        writer = SummaryWriter(str(out / "tensorboard" / method))
        for x, v in zip(xs, values):
            writer.add_scalar("roar/score_vs_fraction_pct", v, global_step=round(100 * x))
        writer.close()
    (out / "curve.json").write_text(json.dumps({"fractions": xs, "scores": curves}, indent=2))


def _at(values: Dict[str, Dict[str, float]], fraction: float, stat: str = "mean") -> float:
    """``stat`` (mean, std, ...) of the score at ``fraction`` from a method's summary row (NaN when missing)."""
    for name, s in values.items():
        if name.endswith(f"@{fraction:g}"):
            return float(s.get(stat, float("nan")))
    return float("nan")
