"""clipib: information-bottleneck attribution for CLIP-style vision-language models.

The public API, re-exported flat (DESIGN.md §3)::

    clip = clipib.load_clip("ViT-B-32-quickgelu", pretrained="openai")
    attr = clipib.M2IB(clip).attribute(images, ids, modality="both")    # preprocessed tensors
    attr = clipib.explain(clip, "cat.jpg", "a cat on a sofa")             # paths / PIL images and strings
    attr.save("outputs/cat")                                              # PNG, JSON, escaped HTML

``clipib.metrics`` (the metrics and :data:`~clipib.metrics.METRICS`) is imported with the package.
"""

from clipib import metrics
from clipib.api import InputError, explain
from clipib.attribution import (METHODS, M2IB, NIB, AdaIB, Attribution, Attributor, GradECLIP, InputIBA, Inputs,
                                LeGrad)
from clipib.metrics import METRICS
from clipib.models.loading import ModelLoadError, load_clip, load_transforms
from clipib.models.split import SplitCLIP, UnsupportedModelError

__version__ = "0.1.0"
__all__ = [
    "METHODS", "METRICS", "M2IB", "NIB", "AdaIB", "Attribution", "Attributor", "GradECLIP", "InputError", "Inputs",
    "InputIBA", "LeGrad", "ModelLoadError", "SplitCLIP", "UnsupportedModelError", "explain", "load_clip", "load_transforms", "metrics",
]
