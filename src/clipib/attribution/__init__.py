"""Attribution methods behind one contract; importing this package fills :data:`METHODS`."""

from clipib.attribution.base import METHODS, Attribution, Attributor, register
from clipib.attribution.m2ib import M2IB
from clipib.attribution.nib import NIB
from clipib.attribution.adaib import AdaIB
from clipib.attribution import baselines  # noqa: F401  (registers the baselines)

__all__ = ["METHODS", "Attribution", "Attributor", "register", "M2IB", "NIB", "AdaIB"]
