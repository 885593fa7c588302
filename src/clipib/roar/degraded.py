"""ROAR's degraded view of a dataset: each sample's top features, by its own stored map, removed.

The maps come from an ``eval.py`` run's attribution store (:func:`clipib.callbacks.records.index_store`: indexed
once by sample key, each map read from its tar at its byte offset, in the DataLoader worker that reads the
sample). Which features go and what replaces them is :mod:`clipib.removal`'s (the one removal kernel):
:func:`~clipib.removal.top_fraction_mask` per sample, then :func:`~clipib.removal.remove_image` (pixels:
channel mean, blur, ROAD) or :func:`~clipib.removal.remove_tokens` (tokens: a stated blank id). A sample
without a stored map is an error naming its key; a sample only ever reads its own map.
"""

from __future__ import annotations

from typing import Any, Dict, Mapping, Optional

import torch
from torch.utils.data import Dataset

from clipib.callbacks.records import MapEntry, read_map
from clipib.data.common import Tokenizer, is_skip
from clipib.removal import (PAD_ID, content_tokens, key_seeds, keyed_normal, remove_image, remove_tokens,
                            top_fraction_mask)

MODALITIES = ("image", "text", "both")
DEFAULT_QUANTILE = {"image": 0.75, "text": 0.5}
"""M2IB Sec. 4.4 / Fig. 3: image pixels above the 75th percentile of the map, tokens above the 50th (the count
:func:`~clipib.removal.top_fraction_mask` gives ``quantile=``: 1,024 of 4,096 pixels, 1 of 3 content tokens)."""


def noise_seeds(key: str, seed: int = 0) -> torch.Tensor:
    """``[1]`` seed of a sample's ROAD noise: a stream apart from its tie-break map's (``key_seeds([key], seed)``).

    Were they one stream, the noise of pixel ``i`` in the first channel would be its tie-break value: the
    background pixels a binary map removes (those with the highest tie-break values) would get noise of positive
    mean and the object's zero-mean noise, so the fill would mark which removed pixels were the object.

    >>> bool(noise_seeds("a") != key_seeds(["a"]))
    True
    """
    return key_seeds([f"road-noise/{key}"], seed)


class MissingMapError(LookupError):
    """A sample has no stored map for the method (its key is in the message)."""


class DegradedDataset(Dataset):
    """``dataset`` (items in clipib's batch contract) with each sample's top features removed by its stored map.

    Args:
        dataset: a map-style dataset of items ``{"key", "image" [3, H, W], "caption"[, "ids"]}`` (skip markers pass).
        maps: ``{key: entry}`` of :func:`clipib.callbacks.records.index_store` (one method and seed).
        modality: ``"image"``, ``"text"`` or ``"both"``: which side is degraded.
        fraction: share of each sample's features removed (the removal curve); ``None``: M2IB's "above the 75th
            percentile" for pixels, "above the 50th" for tokens (:data:`DEFAULT_QUANTILE`).
        fill: what a removed pixel becomes (:func:`clipib.removal.remove_image`: ``"mean"`` = the image's
            channel mean, M2IB's; ``"blur"``; ``"road"`` = ROAD's noisy linear imputation).
        blank_id: what a removed token becomes (default 0, open_clip's padding id: M2IB's blank token).
        ties: :func:`~clipib.removal.top_fraction_mask`'s tie rule; ``"rank"`` removes exactly the fraction,
            ties broken by a random map drawn from the sample's key (``tie_seed``), so a binary ground-truth map
            does not remove the background in reading order.
        tie_seed: seeds the tie-break map and (on a stream of its own, :func:`noise_seeds`) ROAD's noise.
        tokenizer: tokenizes captions of items without ``"ids"`` (text modality).
        road_iters: ROAD's solver steps.
    """

    def __init__(self, dataset: Dataset, maps: Mapping[str, MapEntry], modality: str = "image",
                 fraction: Optional[float] = None, fill: str = "mean", blank_id: int = PAD_ID, ties: str = "rank",
                 tie_seed: int = 0, tokenizer: Optional[Tokenizer] = None, road_iters: int = 30) -> None:
        if modality not in MODALITIES:
            raise ValueError(f"modality must be one of {MODALITIES}, got {modality!r}")
        if fraction is not None and not 0.0 <= fraction <= 1.0:
            raise ValueError(f"fraction must lie in [0, 1], got {fraction}")
        self.dataset, self.maps, self.modality = dataset, maps, modality
        self.fraction, self.fill, self.blank_id, self.ties = fraction, fill, blank_id, ties
        self.tie_seed, self.tokenizer, self.road_iters = tie_seed, tokenizer, road_iters

    def __len__(self) -> int:
        """Number of items of the wrapped dataset."""
        return len(self.dataset)  # type: ignore[arg-type]

    def _amount(self, side: str) -> dict:
        """``top_fraction_mask``'s amount: ``fraction=`` when given, else M2IB's ``quantile=``."""
        return {"quantile": DEFAULT_QUANTILE[side]} if self.fraction is None else {"fraction": self.fraction}

    def _entry(self, key: str, side: str) -> tuple:
        entry = self.maps.get(key)
        if entry is None:
            raise MissingMapError(f"no stored map for sample {key!r}: the attribution store does not hold it "
                                  "(was the eval run on the same data, method and seed?)")
        if side not in entry:
            raise MissingMapError(f"sample {key!r} has no stored {side} map (eval ran another modality)")
        return entry[side]

    def _ties(self, key: str, shape: tuple) -> Optional[torch.Tensor]:
        if self.ties != "rank":
            return None
        return keyed_normal(key_seeds([key], self.tie_seed), shape)  # [1, *shape]

    def degrade_image(self, key: str, image: torch.Tensor) -> torch.Tensor:
        """``image [3, H, W]`` with the top fraction of its stored map's pixels removed."""
        scores = torch.from_numpy(read_map(self._entry(key, "image"))).float()[None]  # [1, H, W]
        if scores.shape[-2:] != image.shape[-2:]:
            raise ValueError(f"sample {key!r}: stored image map {tuple(scores.shape[-2:])} does not match the "
                             f"image {tuple(image.shape[-2:])} (another preprocess?)")
        gone = top_fraction_mask(scores, ties=self.ties, **self._amount("image"),
                                 tiebreak=self._ties(key, tuple(scores.shape[-2:])))
        out = remove_image(image[None], gone, self.fill, seeds=noise_seeds(key, self.tie_seed), iters=self.road_iters)
        return out[0]

    def degrade_ids(self, key: str, ids: torch.Tensor) -> torch.Tensor:
        """``ids [ctx]`` with the top fraction of the caption's content tokens (SOT / EOT kept) blanked."""
        scores = torch.from_numpy(read_map(self._entry(key, "text"))).float()[None]  # [1, ctx]
        if scores.shape[-1] != ids.shape[-1]:
            raise ValueError(f"sample {key!r}: stored token map has {scores.shape[-1]} positions, ids {ids.shape[-1]}")
        valid = content_tokens(ids[None])  # [1, ctx]
        gone = top_fraction_mask(scores, valid=valid, ties=self.ties, **self._amount("text"),
                                 tiebreak=self._ties(key, tuple(scores.shape[-1:])))
        return remove_tokens(ids[None], gone, self.blank_id)[0]

    def __getitem__(self, index: int) -> Dict[str, Any]:
        """Item ``index`` of the wrapped dataset, degraded (``"ids"`` added when the text side is degraded)."""
        item = self.dataset[index]
        if is_skip(item):
            return item
        item, key = dict(item), item["key"]
        if self.modality in ("image", "both"):
            item["image"] = self.degrade_image(key, item["image"])
        if self.modality in ("text", "both"):
            ids = item.get("ids")
            if ids is None:
                if self.tokenizer is None:
                    raise ValueError("text degradation of items without 'ids' needs a tokenizer")
                ids = self.tokenizer([item["caption"]])[0]
            item["ids"] = self.degrade_ids(key, torch.as_tensor(ids).long())
        return item
