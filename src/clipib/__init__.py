"""clipib: information-bottleneck attribution for CLIP-style vision-language models.

The public API, re-exported flat (DESIGN.md §3)::

    clip = clipib.load_clip("ViT-B-32-quickgelu", pretrained="openai")
    attr = clipib.M2IB(clip).attribute(images, ids, modality="both")
"""

from clipib.attribution import METHODS, M2IB, NIB, AdaIB, Attribution, Attributor, GradECLIP, LeGrad
from clipib.models.loading import ModelLoadError, load_clip, load_transforms
from clipib.models.split import SplitCLIP, UnsupportedModelError

__version__ = "0.1.0"
__all__ = [
    "METHODS", "M2IB", "NIB", "AdaIB", "Attribution", "Attributor", "GradECLIP", "LeGrad", "ModelLoadError", "SplitCLIP",
    "UnsupportedModelError", "load_clip", "load_transforms",
]
