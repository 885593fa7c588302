"""The ground-truth "method": its maps are the object the batch says the caption names.

An upper reference for the localisation and perturbation metrics (issue 14) and the ROAR issue: the image map is
the batch's object region (:func:`clipib.regions.ground_truth`: the mask where the sample has one,
else its box) as 1 inside / 0 outside at pixel resolution, so ``image_grid`` is each patch's share of object
pixels; the token scores are 1 on the batch's ``gold_tokens`` and 0 elsewhere. It reads the ground truth from
the eval batch, so it runs through :meth:`Oracle.attribute_batch`; plain :meth:`Oracle.attribute` (images and
ids only) raises. A sample whose region is empty (a box cropped away) gets an all-zero map, which the metrics
count as skipped.
"""

from __future__ import annotations

from typing import Any, List, Mapping, Optional, Sequence

import torch
from torch import Tensor

from clipib.attribution.base import Attribution, Attributor, Modality, Scores, to_maps
from clipib.regions import ground_truth


class Oracle(Attributor):
    """Maps = the ground truth of the eval batch (object mask / box; gold tokens).

    Args:
        clip: the model (its input size and token spans shape the maps).
        seed: unused (the oracle is deterministic); kept for the common constructor.

    Example:
        >>> from clipib import load_clip
        >>> clip = load_clip("clipib-shapes")
        >>> ids = clip.tokenize(["a red circle"])
        >>> gold = torch.zeros_like(ids, dtype=torch.bool); gold[0, 1:3] = True
        >>> batch = {"image": torch.zeros(1, 3, 64, 64), "ids": ids, "box": torch.tensor([[0.0, 0.0, 32.0, 64.0]]),
        ...          "gold_tokens": gold}
        >>> attr = Oracle(clip).attribute_batch(batch)
        >>> attr.image[0, 0, :2].tolist(), attr.image[0, 0, -2:].tolist(), attr.text[0, :4].tolist()
        ([1.0, 1.0], [0.0, 0.0], [0.0, 1.0, 1.0, 0.0])
    """

    name = "oracle"
    NEEDS_BATCH = True

    def attribute(
        self, images: Tensor, ids: Tensor, modality: Modality = "both", seeds: Optional[Sequence[int]] = None
    ) -> Attribution:
        """Refused: the oracle needs the batch's ground truth; call :meth:`attribute_batch`."""
        raise ValueError("the oracle method reads the ground truth from the eval batch: call "
                         "attribute_batch(batch) with batch['mask'] / batch['box'] and batch['gold_tokens']")

    def attribute_batch(
        self, batch: Mapping[str, Any], modality: Modality = "both", seeds: Optional[Sequence[int]] = None
    ) -> Attribution:
        """The ground-truth maps of ``batch`` for ``modality`` (``seeds`` are checked, then ignored)."""
        images, ids = batch["image"], batch["ids"]
        self._check(images, ids, modality, seeds)
        image = text = None
        if modality in ("image", "both"):
            image = ground_truth(batch, "oracle", self.clip.image_size).to(images.device, torch.float32)  # [B, H, W]
        if modality in ("text", "both"):
            gold = batch.get("gold_tokens")
            if gold is None:
                raise ValueError("the oracle's text maps need batch['gold_tokens'] (a dataset with gold words)")
            text = gold.to(ids.device, torch.float32)  # [B, ctx]
        return to_maps(self.clip, ids, image=image, text=text)

    def image_scores(self, images: Tensor, ids: Tensor, target: Tensor, generators: List[torch.Generator]) -> Scores:
        """Not used: the maps come from the batch (:meth:`attribute_batch`)."""
        raise ValueError("the oracle has no image scores without a batch: call attribute_batch(batch)")

    def text_scores(self, images: Tensor, ids: Tensor, target: Tensor, generators: List[torch.Generator]) -> Scores:
        """Not used: the maps come from the batch (:meth:`attribute_batch`)."""
        raise ValueError("the oracle has no token scores without a batch: call attribute_batch(batch)")
