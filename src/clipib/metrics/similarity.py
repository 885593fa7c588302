"""The pair's cosine similarity: a sanity column recorded with every method's image modality."""

from __future__ import annotations

from typing import Dict

import torch
from torch import Tensor

from clipib.attribution.base import Attribution
from clipib.attribution.common import cosine, unit_rows
from clipib.metrics.base import AttributionMetric, Batch
from clipib.models.split import SplitCLIP

__all__ = ["pair_cosine", "Similarity"]


@torch.no_grad()
def pair_cosine(clip: SplitCLIP, images: Tensor, ids: Tensor) -> Tensor:
    """Cosine of each image ``[B, 3, H, W]`` with its caption ``[B, ctx]``: ``[B]``; NaN where either embedding
    is zero or not finite (the normalised embedding of a zero vector is zero: its cosine is undefined, not 0)."""
    e_img, e_txt = clip.image.encode(images), clip.text.encode(ids)
    cos = cosine(e_img, e_txt)
    return cos.masked_fill(~(unit_rows(e_img) & unit_rows(e_txt)), float("nan"))


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
    CONSTANT_MAP = "unused"

    def score(self, clip: SplitCLIP, batch: Batch, attr: Attribution, modality: str) -> Dict[str, Tensor]:
        """``cos`` per pair."""
        return {"cos": pair_cosine(clip, batch["image"], batch["ids"])}
