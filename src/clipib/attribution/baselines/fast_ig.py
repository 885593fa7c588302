"""FastIG (Hesse, Schaub-Meyer, Roth, NeurIPS 2021, "Fast Axiomatic Attribution for Neural Networks").

For a nonnegatively homogeneous model (``f(αx) = αf(x)`` for α ≥ 0), integrated gradients with the zero
baseline equals input × gradient, ``x ⊙ ∇_x f(x)``, computed in one forward and one backward pass; the paper
calls this FastIG and builds such models (X-DNNs) on purpose. CLIP is **not** homogeneous (biases,
LayerNorm, softmax attention, the cosine itself), so here FastIG is the method as defined, ``x ⊙ ∇_x cos``,
and not exact IG. Computed with Captum's ``InputXGradient``.

Inputs: the preprocessed pixels (zero = the normalisation mean colour) and the rows of the token-embedding
table (positional embeddings are added inside the model and are not attributed). Maps: summed over colour
channels (``[B, H, W]`` pixel scores) and over embedding channels (``[B, L]``), signed.
"""

from __future__ import annotations

from typing import List

import torch
from captum.attr import InputXGradient
from torch import Tensor

from clipib.attribution.base import Attributor, Scores
from clipib.attribution.common import ScoreFn, image_cosine, text_cosine
from clipib.models.split import SplitCLIP


def fast_ig(score: ScoreFn, x: Tensor) -> Tensor:
    """``x ⊙ ∇_x score(x)``, the same shape as ``x``; ``score`` maps ``[B, ...]`` to ``[B]`` row-wise.

    Equals integrated gradients from the zero baseline when ``score`` is nonnegatively homogeneous.
    """
    return InputXGradient(score).attribute(x.detach().clone().requires_grad_(True))


class FastIG(Attributor):
    """Input × gradient of the pair's cosine (FastIG), on pixels and on token embeddings.

    Args:
        clip: the model.
        seed: unused (deterministic); kept for the common constructor.
    """

    name = "fast_ig"

    def __init__(self, clip: SplitCLIP, seed: int = 0) -> None:
        super().__init__(clip, seed=seed)

    def image_scores(self, images: Tensor, ids: Tensor, target: Tensor, generators: List[torch.Generator]) -> Scores:
        return fast_ig(image_cosine(self.clip, target), images).sum(1), {}  # [B, H, W]

    def text_scores(self, images: Tensor, ids: Tensor, target: Tensor, generators: List[torch.Generator]) -> Scores:
        text = text_cosine(self.clip, ids, target)
        return fast_ig(text.score, text.embeddings).sum(-1), {}  # [B, L]
