"""Training entry point: ``python train.py fit -c configs/train/<name>.yaml``.

Everything is configuration: the LightningModule and DataModule are chosen by ``class_path`` in the YAML
(e.g. ``clipib.lit.pretrain_module.ContrastivePretrainModule`` + ``clipib.data.TrainDataModule``); configs compose
with repeated ``-c`` (a base and a stage overlay, a ``configs/trainer/`` block).
"""

from __future__ import annotations

from lightning import LightningDataModule, LightningModule
from lightning.pytorch.cli import LightningCLI


def main(args: list[str] | None = None) -> LightningCLI:
    """Run the Lightning CLI (``fit``/``validate``/``test``) on the given or command-line arguments."""
    return LightningCLI(LightningModule, LightningDataModule, subclass_mode_model=True,
                        subclass_mode_data=True, save_config_kwargs={"overwrite": True}, args=args)


if __name__ == "__main__":
    main()
