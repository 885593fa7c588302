"""Model-randomisation curves: per method, the similarity of its maps to the original ones at each step of the
cascade (:class:`~clipib.metrics.randomisation.ModelRandomisation`), as a PNG and in TensorBoard."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import numpy as np
from lightning.pytorch import Callback, LightningModule, Trainer
from PIL import Image

from clipib.untrusted import safe_name
from clipib.viz import curve_figure, stack

_VALUE = re.compile(r"^(image|text)_mprt_([a-z_]+)_(\d{3})$")

Curves = Dict[str, Tuple[List[float], Dict[str, List[float]]]]
"""``{modality: (steps in %, {statistic: mean per step})}``."""


def mprt_curves(values: Dict[str, Dict[str, float]]) -> Curves:
    """The randomisation curves in one method's summary ``{value: {"mean", ...}}`` (empty when it has none).

    >>> mprt_curves({"image_mprt_rho_000": {"mean": 0.9}, "image_mprt_rho_100": {"mean": 0.1}, "cos": {"mean": 1}})
    {'image': ([0.0, 100.0], {'rho': [0.9, 0.1]})}
    """
    points: Dict[str, Dict[str, Dict[float, float]]] = {}
    for name, stats in values.items():
        match = _VALUE.match(name)
        if match:
            mod, stat, pct = match.groups()
            points.setdefault(mod, {}).setdefault(stat, {})[float(pct)] = float(stats["mean"])
    out: Curves = {}
    for mod, stats in points.items():
        steps = sorted({p for per in stats.values() for p in per})
        out[mod] = (steps, {s: [per.get(p, float("nan")) for p in steps] for s, per in stats.items()})
    return out


def mprt_figure(method: str, curves: Curves) -> Image.Image:
    """One chart per modality, side by side: similarity to the original maps against % of blocks randomised."""
    charts = [curve_figure(steps, lines, title=f"{method} · {mod}: similarity to the original maps",
                           x_label="% of blocks randomised (0: projection only)")
              for mod, (steps, lines) in curves.items()]
    return stack(charts, columns=len(charts))

class RandomisationCurves(Callback):
    """At the end of the test run, ``mprt_<method>.png`` in the run directory (``out_dir`` or
    ``trainer.default_root_dir``) and, in TensorBoard, the image plus one scalar series per curve
    (``mprt/<method>/<modality>_<stat>``, step = % of blocks randomised). Needs ``model_randomisation`` in
    ``model.metrics``; does nothing otherwise."""

    def __init__(self, out_dir: Optional[str] = None) -> None:
        self.out_dir = out_dir

    def on_test_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        summary = pl_module.summary()  # synced: every process calls it
        if trainer.global_rank != 0:
            return
        run = Path(self.out_dir or trainer.default_root_dir)
        experiment = getattr(trainer.logger, "experiment", None) if trainer.logger else None
        for method, values in summary.items():
            curves = mprt_curves(values)
            if not curves:
                continue
            run.mkdir(parents=True, exist_ok=True)
            sheet = mprt_figure(method, curves)
            sheet.save(run / f"mprt_{safe_name(method)}.png")
            if experiment is None:
                continue
            if hasattr(experiment, "add_image"):
                experiment.add_image(f"mprt/{method}", np.asarray(sheet), 0, dataformats="HWC")
            if hasattr(experiment, "add_scalar"):
                for mod, (steps, lines) in curves.items():
                    for stat, ys in lines.items():
                        for step, y in zip(steps, ys):
                            experiment.add_scalar(f"mprt/{method}/{mod}_{stat}", y, int(step))
        if hasattr(experiment, "flush"):
            experiment.flush()
