"""Baseline attribution methods, one per file (explicit imports; listed in :data:`clipib.attribution.METHODS`)."""

from clipib.attribution.baselines.chefer import Chefer
from clipib.attribution.baselines.fast_ig import FastIG
from clipib.attribution.baselines.grad_cam import GradCAM
from clipib.attribution.baselines.grad_eclip import GradECLIP
from clipib.attribution.baselines.integrated_gradients import IntegratedGradients
from clipib.attribution.baselines.kernel_shap import KernelShap
from clipib.attribution.baselines.legrad import LeGrad
from clipib.attribution.baselines.mfaba import MFABA
from clipib.attribution.baselines.oracle import Oracle
from clipib.attribution.baselines.random_map import RandomMap
from clipib.attribution.baselines.rise import RISE
from clipib.attribution.baselines.saliency import Saliency

__all__ = ["Chefer", "FastIG", "GradCAM", "GradECLIP", "IntegratedGradients", "KernelShap", "LeGrad", "MFABA", "Oracle",
           "RandomMap", "RISE", "Saliency"]
