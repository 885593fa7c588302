"""RoarScoreWriter: the result of one ROAR fine-tuning run, written when the fit ends.

Files in the run directory (``trainer.default_root_dir``)::

    roar.json      {"method", "modality", "fraction", "quantile", "fill", "split_seed", "seed", "val_loss", "val_i2t_top1",
                    "val_t2i_top1", "val_pairs", "epochs", "steps"[, "reference", "reference_loss", "score"]}
    summary.json   eval's shape: {method: {"roar_plus_<modality>" | "roar_<modality>@<fraction>": {"mean", "std", "n"},
                                           "val_loss": ...}}

``score = (L_c - L_o) / L_o`` (M2IB Sec. 4.4): ``L_c`` this run's final validation loss, ``L_o`` the reference
run's (``ROARModule(reference=...)``). An interrupted fit writes nothing, so a sweep reruns (resumes) it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Dict, Optional

from lightning.pytorch import Callback, LightningModule, Trainer

from clipib.callbacks.records import write_summary


def reference_file(reference: str | Path) -> Path:
    """The ``roar.json`` of a reference run given as its directory or the file itself."""
    path = Path(reference)
    return path / "roar.json" if path.is_dir() or path.suffix != ".json" else path


def read_result(path: str | Path) -> Dict[str, Any]:
    """A run's ``roar.json`` (directory or file); a clear error when the run has not finished."""
    file = reference_file(path)
    if not file.is_file():
        raise FileNotFoundError(f"{file} does not exist: the run has not finished (run its fit first)")
    return json.loads(file.read_text())


def metric_name(modality: str, fraction: Optional[float]) -> str:
    """The summary column of a ROAR score: ``roar_plus_image`` at M2IB's percentile rule (``fraction`` None),
    ``roar_image@0.3`` at a removal-curve fraction."""
    return f"roar_{modality}@{fraction:g}" if fraction is not None else f"roar_plus_{modality}"


class RoarScoreWriter(Callback):
    """Write ``roar.json`` / ``summary.json`` and log ``roar/score`` at the end of a finished fit (rank 0, then
    every process waits for it).

    Added by :meth:`clipib.lit.roar_module.ROARModule.configure_callbacks`; reads the module's ``last_val`` and
    ``hparams.reference`` and the datamodule's ``info`` (:class:`clipib.roar.RoarDataModule`).
    """

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        """Fail before training when the reference run has no result yet."""
        reference = getattr(pl_module.hparams, "reference", None)
        if stage == "fit" and reference:
            read_result(reference)

    def on_fit_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Write the run's result (nothing for an interrupted fit or one that validated nothing)."""
        last = getattr(pl_module, "last_val", None)
        if trainer.interrupted or not last:  # the same on every process (last_val is gathered)
            return
        if trainer.is_global_zero:
            self._write(trainer, pl_module, last)
        trainer.strategy.barrier()  # every process returns with roar.json on disk (a sweep checks it next)

    def _write(self, trainer: Trainer, pl_module: LightningModule, last: Dict[str, float]) -> None:
        info = dict(getattr(trainer.datamodule, "info", {}) or {})
        result: Dict[str, Any] = {**info, "seed": _seed(), "val_loss": last["loss"], "val_i2t_top1": last["i2t_top1"],
                                  "val_t2i_top1": last["t2i_top1"], "val_pairs": last["pairs"],
                                  "epochs": trainer.current_epoch, "steps": trainer.global_step}
        reference = getattr(pl_module.hparams, "reference", None)
        if reference:
            l_o = float(read_result(reference)["val_loss"])
            result.update(reference=str(reference_file(reference)), reference_loss=l_o,
                          score=(last["loss"] - l_o) / l_o)
        run = Path(trainer.default_root_dir)
        run.mkdir(parents=True, exist_ok=True)
        (run / "roar.json").write_text(json.dumps(result, indent=2))
        name = info.get("method") or "reference"
        values = {"val_loss": {"mean": last["loss"], "std": 0.0, "n": 1}}
        if "score" in result:
            values[metric_name(info.get("modality", "image"), info.get("fraction"))] = {
                "mean": result["score"], "std": 0.0, "n": 1}
            if trainer.logger is not None:
                trainer.logger.log_metrics({"roar/score": result["score"]}, step=trainer.global_step)
        write_summary(run, {name: values}, {"runs": 1})
        print(f"ROAR run finished: {json.dumps({k: result.get(k) for k in ('method', 'val_loss', 'score')})} "
              f"-> {run / 'roar.json'}")


def _seed() -> Optional[int]:
    """The global seed Lightning's ``seed_everything`` set (``PL_GLOBAL_SEED``), if any."""
    import os

    value = os.environ.get("PL_GLOBAL_SEED")
    return int(value) if value is not None else None
