"""Training entry point: ``python train.py fit -c configs/train/<name>.yaml``.

Everything is configuration: the LightningModule and DataModule are chosen by ``class_path`` in the YAML
(e.g. ``clipib.lit.pretrain_module.ContrastivePretrainModule`` + ``clipib.data.TrainDataModule``, or the ROAR retrain
jobs' ``clipib.lit.roar_module.ROARModule`` + ``clipib.roar.RoarDataModule``); configs compose with repeated ``-c``
(a base and a stage overlay, a ``configs/trainer/`` block). ``--ckpt_path last`` resumes an interrupted fit.
"""

from __future__ import annotations

from lightning.pytorch.cli import LightningCLI

from clipib.lit.cli import train_cli


def main(args: list[str] | None = None) -> LightningCLI:
    """Run the Lightning CLI (``fit``/``validate``/``test``) on the given or command-line arguments."""
    return train_cli(args)


if __name__ == "__main__":
    main()
