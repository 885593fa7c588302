"""The pair's cosine similarity: a sanity column recorded with every method's image modality."""

from __future__ import annotations

from typing import Dict

import torch
from torch import Tensor

from clipib.attribution.base import Attribution
from clipib.attribution.common import cosine
from clipib.metrics.base import AttributionMetric, Batch
from clipib.models.split import SplitCLIP

__all__ = ["pair_cosine", "Similarity"]


@torch.no_grad()
def pair_cosine(clip: SplitCLIP, images: Tensor, ids: Tensor) -> Tensor:
    """Cosine of each image ``[B, 3, H, W]`` with its caption ``[B, ctx]``: ``[B]``."""
    return cosine(clip.image.encode(images), clip.text.encode(ids))


class Similarity(AttributionMetric):
    """The clean pair's cosine (registry name ``similarity``, value ``cos``, image modality).

    Example:
        >>> from clipib import load_clip
        >>> clip = load_clip("clipib-shapes")  # the shipped 64 px model
        >>> batch = {"image": torch.randn(2, 3, 64, 64), "ids": clip.tokenize(["a dog", "a cat"])}
        >>> metric = Similarity()
        >>> metric.update(clip, batch, Attribution(), "image")["cos"].shape, metric.update(clip, batch, Attribution(), "text")
        (torch.Size([2]), {})
    """

    VALUES = {"image": ("cos",)}

    def score(self, clip: SplitCLIP, batch: Batch, attr: Attribution, modality: str) -> Dict[str, Tensor]:
        """``cos`` per pair."""
        return {"cos": pair_cosine(clip, batch["image"], batch["ids"])}
