"""Training entry point: ``python train.py fit -c configs/train/<name>.yaml``.

Everything is configuration: the LightningModule and DataModule are chosen by ``class_path`` in the YAML
(e.g. ``clipib.lit.pretrain_module.ContrastivePretrainModule`` + ``clipib.data.synthetic.ShapesDataModule``).
"""

from __future__ import annotations

import sys
from pathlib import Path

from lightning import LightningDataModule, LightningModule
from lightning.pytorch.cli import LightningCLI

try:  # run from a source checkout without `pip install -e .`
    import clipib  # noqa: F401
except ImportError:  # pragma: no cover - exercised only without an install
    sys.path.insert(0, str(Path(__file__).resolve().parent / "src"))


def main(args: list[str] | None = None) -> LightningCLI:
    """Run the Lightning CLI (``fit``/``validate``/``test``) on the given or command-line arguments."""
    return LightningCLI(LightningModule, LightningDataModule, subclass_mode_model=True,
                        subclass_mode_data=True, save_config_kwargs={"overwrite": True}, args=args)


if __name__ == "__main__":
    main()
