"""LightningCLI set-up of ``eval.py``: trainer defaults, the default callbacks and logger, config saving.

An eval YAML needs only ``model:``, ``data:`` and ``trainer.default_root_dir``: the records callback
(:class:`~clipib.callbacks.records.RecordWriter`, configurable under the top-level ``records:`` key), a
TensorBoard logger writing to ``<default_root_dir>/tensorboard`` (no ``hp_metric`` placeholder) and its views
(:class:`~clipib.callbacks.tensorboard.TensorBoardViews`, one run per method; settings under ``tensorboard:``)
are always there.
"""

from __future__ import annotations

import errno
import sys
from pathlib import Path
from typing import List, Optional

from jsonargparse import Namespace
from lightning import LightningDataModule, LightningModule
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.cli import LightningCLI, SaveConfigCallback

from clipib.callbacks.records import RecordWriter
from clipib.callbacks.tensorboard import TensorBoardViews
from clipib.models.loading import ModelLoadError


class RunConfigSaver(SaveConfigCallback):
    """Save the resolved config as ``config.yaml`` in the run folder (``trainer.default_root_dir``)."""

    def setup(self, trainer, pl_module, stage: str) -> None:
        if trainer.is_global_zero:
            run = Path(trainer.default_root_dir)
            run.mkdir(parents=True, exist_ok=True)
            self.parser.save(self.config, run / self.config_filename, skip_unset=False, overwrite=True,
                             multifile=False)


EVAL_TRAINER_DEFAULTS = {
    "inference_mode": False,  # gradient methods need autograd inside the test loop (DESIGN.md §5)
    "enable_checkpointing": False,
    "use_distributed_sampler": False,  # the DataModule brings an unrepeated sampler (no padded duplicates)
    "accelerator": "auto",
    "devices": 1,
}


class EvalCLI(LightningCLI):
    """``eval.py``: RecordWriter and a TensorBoard logger by default; the data gets the model's transforms from
    the module (``AttributionModule.setup`` -> ``datamodule.use_model``), so the model is named in one place."""

    def add_arguments_to_parser(self, parser) -> None:
        """The records callback and the TensorBoard views are always added (settings under ``records:`` and
        ``tensorboard:``)."""
        parser.add_lightning_class_args(RecordWriter, "records")
        parser.add_lightning_class_args(TensorBoardViews, "tensorboard")

    def before_instantiate_classes(self) -> None:
        """Without a configured logger, log to TensorBoard in ``<default_root_dir>/tensorboard``."""
        config = self.config[self.subcommand] if self.subcommand else self.config
        if config.trainer.get("logger") in (None, True):
            root = config.trainer.get("default_root_dir") or "."
            config.trainer.logger = Namespace(
                class_path="lightning.pytorch.loggers.TensorBoardLogger",
                init_args=Namespace(save_dir=root, name="tensorboard", default_hp_metric=False))

    def instantiate_trainer(self, **kwargs):
        """The trainer with the default callbacks; a RecordWriter listed in ``trainer.callbacks`` (older configs)
        replaces the default one, so records are written once."""
        config = {**self._get(self.config_init, "trainer", default={}), **kwargs}
        listed = config.get("callbacks") or []
        listed = listed if isinstance(listed, list) else [listed]
        extra = [self._get(self.config_init, c) for c in self._parser(self.subcommand).callback_keys]
        if any(isinstance(c, RecordWriter) for c in listed):
            extra = [c for c in extra if not isinstance(c, RecordWriter)]
        return self._instantiate_trainer(config, extra)


def eval_cli(**kwargs) -> LightningCLI:
    """The ``eval.py`` command line: ``python eval.py test -c configs/eval/<name>.yaml``."""
    from clipib.data.datamodule import EvalDataModule
    from clipib.lit.attribution_module import AttributionModule

    return EvalCLI(
        AttributionModule, EvalDataModule, subclass_mode_data=True, save_config_callback=RunConfigSaver,
        trainer_defaults=EVAL_TRAINER_DEFAULTS, seed_everything_default=0, **kwargs,
    )


class TrainCLI(LightningCLI):
    """``train.py``: any LightningModule / DataModule by ``class_path``; the resolved config saved as
    ``<default_root_dir>/config.yaml``; unless checkpointing is off or a ``ModelCheckpoint`` is configured, the
    last checkpoint is kept in ``<default_root_dir>/checkpoints/last.ckpt`` (one place for every attempt, so
    ``--ckpt_path last`` resumes an interrupted run)."""

    def instantiate_trainer(self, **kwargs):
        """The trainer, with the default last-checkpoint callback."""
        config = {**self._get(self.config_init, "trainer", default={}), **kwargs}
        listed = config.get("callbacks") or []
        listed = listed if isinstance(listed, list) else [listed]
        extra = [self._get(self.config_init, c) for c in self._parser(self.subcommand).callback_keys]
        if config.get("enable_checkpointing") is not False and not any(isinstance(c, ModelCheckpoint) for c in listed):
            root = Path(config.get("default_root_dir") or ".")
            extra.append(ModelCheckpoint(dirpath=root / "checkpoints", save_last="link"))  # last.ckpt: a link to the newest
        return self._instantiate_trainer(config, extra)


def train_cli(args: list[str] | None = None, **kwargs) -> LightningCLI:
    """The ``train.py`` command line: ``python train.py fit -c configs/<train|roar>/<name>.yaml``."""
    return TrainCLI(LightningModule, LightningDataModule, subclass_mode_model=True, subclass_mode_data=True,
                    save_config_callback=RunConfigSaver, args=args, **kwargs)


WRITE_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EACCES, errno.EPERM, errno.EROFS})
"""Errors of the disk rather than of the code: a full disk or quota, a directory the job may not write."""


def run_eval(args: Optional[List[str]] = None) -> int:
    """Run :func:`eval_cli`; a full disk or a permission error is one line on stderr and exit code 1, a model
    that cannot be loaded (missing or refused checkpoint, unsplittable tower) one line and exit code 2.

    What was written before the error stays readable (records are appended whole lines at a time, the store's
    members are flushed before their records, summaries are replaced atomically), and re-running the same
    command once the disk is fixed resumes.
    """
    try:
        eval_cli(args=args)
    except ModelLoadError as err:  # a refused or missing checkpoint, an unsplittable model: one line
        print(f"eval.py: error: {err}", file=sys.stderr)
        return 2
    except OSError as err:
        if err.errno not in WRITE_ERRNOS:
            raise
        where = f" {err.filename}" if err.filename else ""
        print(f"eval.py: error: cannot write{where}: {err.strerror or err}. What was written before is kept; "
              "fix the disk or permissions and re-run the same command to resume.", file=sys.stderr)
        return 1
    return 0
