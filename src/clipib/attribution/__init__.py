"""Attribution methods behind one contract (:class:`Attributor`), and the registry :data:`METHODS`.

Adding a method: one file (a subclass of :class:`Attributor` with a ``name``) and one line in the tuple below.
"""

from typing import Dict, Type

from clipib.attribution.adaib import AdaIB
from clipib.attribution.base import Attribution, Attributor, Inputs, check_inputs, to_maps
from clipib.attribution.baselines import (
    MFABA,
    Oracle,
    RISE,
    Chefer,
    FastIG,
    GradCAM,
    GradECLIP,
    IntegratedGradients,
    KernelShap,
    LeGrad,
    RandomMap,
    Saliency,
)
from clipib.attribution.input_iba import InputIBA
from clipib.attribution.m2ib import M2IB
from clipib.attribution.nib import NIB

METHODS: Dict[str, Type[Attributor]] = {
    cls.name: cls
    for cls in (M2IB, NIB, AdaIB, GradCAM, Saliency, Chefer, IntegratedGradients, FastIG, MFABA, RISE, KernelShap,
                RandomMap, Oracle, LeGrad, GradECLIP, InputIBA)
}
"""Registry ``name -> Attributor subclass``; every class builds from the model alone with its paper's defaults."""

__all__ = ["METHODS", "Attribution", "Attributor", "Inputs", "check_inputs", "to_maps", "M2IB", "NIB", "AdaIB",
           "InputIBA", "Chefer", "FastIG", "GradCAM", "GradECLIP", "IntegratedGradients", "KernelShap", "LeGrad", "MFABA", "Oracle",
           "RandomMap", "RISE", "Saliency"]
