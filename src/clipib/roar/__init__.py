"""ROAR retrain jobs (issue 13): the degraded data of ROAR+ (M2IB Sec. 4.4) and the removal curve (InputIBA
App. D.4), and the sweep that runs and resumes their grids (:mod:`clipib.roar.sweep`, ``clipib roar``).
The fine-tuning itself is :class:`clipib.lit.roar_module.ROARModule`; docs/roar.md describes the protocols.
"""

from clipib.roar.datamodule import RoarDataModule, split_positions
from clipib.roar.degraded import DegradedDataset, MissingMapError

__all__ = ["DegradedDataset", "MissingMapError", "RoarDataModule", "split_positions"]
