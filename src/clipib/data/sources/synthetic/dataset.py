"""The shapes world as a clipib source: :class:`ShapesDataset` (items in the batch contract, with pixel and
token ground truth) and :class:`WordTokens` (where a caption's colour and shape words are in its ids).

YAML (the eval test split; training uses the same class for its splits, see ``configs/train/``)::

    dataset:
      class_path: clipib.data.sources.synthetic.ShapesDataset
      init_args: {size: 128, seed: 2, split: test, mismatch_rate: 0.25}
"""

from __future__ import annotations

from typing import Iterable, Optional

import numpy as np
import torch
from PIL import Image

from clipib.data.common import Preprocess, Tokenizer
from clipib.data.sources.base import ModelTransforms, Source
import clipib.data.sources.synthetic.world as world
from clipib.data.sources.synthetic.world import IMAGE_SIZE, PAIR_INDEX, ShapesSample


def _to_tensor01(image: Image.Image) -> torch.Tensor:
    """PIL RGB -> FloatTensor[3, H, W] in [0, 1] (used when no model preprocess is given)."""
    return torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0).permute(2, 0, 1).contiguous()


class WordTokens:
    """Finds the token positions of words inside tokenized captions, for any open_clip-style tokenizer.

    A word's tokens are those of ``tokenizer([word])`` minus the tokens of ``tokenizer([""])`` (SOT, EOT,
    padding); its positions are where that token run occurs in the caption's ids.
    """

    def __init__(self, tokenizer: Tokenizer) -> None:
        """Wrap ``tokenizer`` (``list[str] -> LongTensor[B, ctx]``) with a per-word cache."""
        self.tokenizer = tokenizer
        self._special = set(tokenizer([""])[0].tolist())
        self._cache: dict[str, list[int]] = {}

    def word_ids(self, word: str) -> list[int]:
        """Token ids of ``word`` alone (no special tokens)."""
        if word not in self._cache:
            self._cache[word] = [t for t in self.tokenizer([word])[0].tolist() if t not in self._special]
        return self._cache[word]

    def mask(self, ids: torch.Tensor, words: list[str]) -> torch.Tensor:
        """BoolTensor[ctx]: True at the first occurrence of each word's token run in ``ids`` [ctx]."""
        out = torch.zeros(ids.shape[-1], dtype=torch.bool)
        seq = ids.tolist()
        for word in words:
            run = self.word_ids(word)
            hits = [p for p in range(len(seq) - len(run) + 1) if run and seq[p:p + len(run)] == run]
            if not hits:
                raise ValueError(f"word {word!r} not found in the tokenized caption")
            out[hits[0]:hits[0] + len(run)] = True
        return out


def sample_to_item(sample: ShapesSample, preprocess: Preprocess | None = None,
                   words: Optional[WordTokens] = None) -> dict[str, object]:
    """One sample as a dict in the batch contract (``mask``/``box`` at the preprocessed image's size).

    Extra keys for retrieval: ``present`` BoolTensor[24] (pairs in the image), ``pair`` (index in
    ``PAIRS`` of the pair the caption names), ``colour``/``shape`` words.
    """
    image = (preprocess or _to_tensor01)(sample.image)  # [3, H, W]
    h, w = image.shape[-2:]
    mask = torch.from_numpy(sample.mask)  # [64, 64]
    box = torch.tensor(sample.box, dtype=torch.float32)  # xyxy in 64-px image pixels
    if (h, w) != mask.shape:  # square source: resize + centre crop is a plain rescale
        mask = torch.nn.functional.interpolate(mask[None, None].float(), size=(h, w), mode="nearest")[0, 0] > 0.5
        box = box * torch.tensor([w, h, w, h], dtype=torch.float32) / IMAGE_SIZE
    item: dict[str, object] = {
        "image": image, "key": sample.key, "caption": sample.caption, "mask": mask, "box": box,
        "matched": torch.tensor(sample.matched), "present": torch.from_numpy(sample.present()),
        "pair": torch.tensor(PAIR_INDEX[(sample.colour, sample.shape)]),
        "colour": sample.colour, "shape": sample.shape,
    }
    if words is not None:
        ids = words.tokenizer([sample.caption])[0]  # [ctx]
        item["ids"] = ids
        item["gold_tokens"] = words.mask(ids, [sample.colour, sample.shape])
    return item


class ShapesDataset(Source):
    """Map-style source of ``size`` shapes pairs; item ``i`` is ``generate_sample(seed, i)`` as a dict.

    Args:
        size, seed, split: the split (``split`` names the keys, ``shapes-<split>-<i>``).
        mismatch_rate: probability that a pair's caption names an absent object.
        minimal_pairs: the training option of ``generate_sample``.

    The model's transforms come from :meth:`use_transforms` (the DataModule hands them; standalone:
    ``ds.use_transforms(ModelTransforms.from_clip(clip))``): images go through its preprocess and items
    carry ``ids`` and ``gold_tokens``. Without them images are [0, 1] tensors ``[3, 64, 64]`` and no ids.

    Excluded keys are dropped from the index list before any sample is generated.
    """

    def __init__(self, size: int, seed: int, split: str = "test", mismatch_rate: float = 0.0,
                 minimal_pairs: bool = False) -> None:
        """Describe the split; nothing is generated until an item is read."""
        if size < 0:
            raise ValueError(f"size must be >= 0, got {size}")
        self.size, self.seed, self.split, self.mismatch_rate = size, seed, split, mismatch_rate
        self.minimal_pairs = minimal_pairs
        self.preprocess: Optional[Preprocess] = None
        self.words: Optional[WordTokens] = None
        self.indices = range(size)  # sample indices still to serve (all unless some are excluded)

    def use_transforms(self, transforms: ModelTransforms) -> None:
        """Use the model's preprocess and tokenizer (items then carry ``ids`` and ``gold_tokens``)."""
        super().use_transforms(transforms)
        self.preprocess, self.words = transforms.preprocess, WordTokens(transforms.tokenizer)

    def exclude(self, keys: Iterable[str]) -> None:
        """Drop the indices whose keys are in ``keys`` (before anything is generated)."""
        super().exclude(keys)
        self.indices = [i for i in range(self.size) if self.key(i) not in self.excluded]

    def key(self, index: int) -> str:
        """The key of sample ``index`` (``generate_sample``'s)."""
        return f"shapes-{self.split}-{index}"

    def __len__(self) -> int:
        """Number of pairs served (the split's size less the excluded ones)."""
        return len(self.indices)

    def sample(self, index: int) -> ShapesSample:
        """The raw ``ShapesSample`` with sample index ``index`` (PIL image, numpy mask, object list)."""
        if not 0 <= index < self.size:
            raise IndexError(f"index {index} out of range for a split of {self.size}")
        return world.generate_sample(self.seed, index, self.mismatch_rate, self.split, self.minimal_pairs)

    def __getitem__(self, position: int) -> dict[str, object]:
        """The ``position``-th served item in the batch contract."""
        return sample_to_item(self.sample(self.indices[position]), self.preprocess, self.words)
