"""LightningCLI set-up shared by ``eval.py`` (and ``train.py``): defaults, config saving in the run folder."""

from __future__ import annotations

from pathlib import Path

from lightning.pytorch.cli import LightningCLI, SaveConfigCallback


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
    """``eval.py``: the data's preprocess and tokenizer follow ``model.model`` (one place to name the model)."""

    def add_arguments_to_parser(self, parser) -> None:
        parser.link_arguments("model.model", "data.model")


def eval_cli(**kwargs) -> LightningCLI:
    """The ``eval.py`` command line: ``python eval.py test -c configs/eval/<name>.yaml``."""
    from clipib.data.datamodule import ClipDataModule
    from clipib.lit.attribution_module import AttributionModule

    return EvalCLI(
        AttributionModule, ClipDataModule, save_config_callback=RunConfigSaver,
        trainer_defaults=EVAL_TRAINER_DEFAULTS, seed_everything_default=0, **kwargs,
    )
