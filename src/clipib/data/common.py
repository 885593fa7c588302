"""Pieces shared by every clipib dataset: strict decoding, skip markers, the batch collate.

Every dataset in :mod:`clipib.data` yields *items*: either a sample

    ``{"key": str, "image": Tensor[3, H, W], "caption": str, "matched": bool, ...}``

(``...``: optional ``"box"`` Tensor[4], ``"mask"`` BoolTensor[H, W]) or a *skip marker*

    ``{"key": str, "skip": reason}``

for a sample that could not be read (truncated or undecodable image, missing or non-UTF-8 caption,
missing file). Skips travel through the DataLoader like samples, so each is reported exactly once
across ranks and workers; :class:`ClipCollate` separates them into the batch's ``"skipped"`` list.
"""

from __future__ import annotations

import io
import os
import re
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

import torch
from PIL import Image, ImageFile
from torch.utils.data import Dataset

Item = Dict[str, Any]
Row = Dict[str, Any]  # a table row: {"key", "image" (path), "caption", ...} or marked {"skip": reason}
Preprocess = Callable[[Image.Image], torch.Tensor]
Tokenizer = Callable[[List[str]], torch.Tensor]
#: ``score(images [B, 3, H, W], captions) -> Tensor[B]``: CLIP similarity of each (image, caption) pair
Score = Callable[[torch.Tensor, List[str]], torch.Tensor]

#: Errors that mean "this image cannot be decoded" (PIL raises ``OSError`` for truncated files,
#: ``UnidentifiedImageError`` (an ``OSError``) for unknown bytes, ``SyntaxError``/``ValueError`` for
#: some malformed headers, ``DecompressionBombError`` for absurd sizes).
IMAGE_ERRORS = (OSError, ValueError, SyntaxError, Image.DecompressionBombError, EOFError)


def skip_item(key: str, reason: str) -> Item:
    """A skip marker: the sample ``key`` could not be used, for ``reason`` (one line)."""
    return {"key": key, "skip": reason}


def is_skip(item: Item) -> bool:
    """Whether ``item`` is a skip marker rather than a sample."""
    return "skip" in item


def decode_image(source: Union[bytes, str, os.PathLike]) -> Image.Image:
    """Open and fully decode an image (bytes or a path) as RGB; raises on truncated or bad data.

    Decoding is forced with ``load()`` so a truncated JPEG fails here, not later inside the transform.
    PIL's global ``ImageFile.LOAD_TRUNCATED_IMAGES`` would silently pad truncated files with grey, so
    it is refused rather than honoured.
    """
    if ImageFile.LOAD_TRUNCATED_IMAGES:
        raise RuntimeError("PIL.ImageFile.LOAD_TRUNCATED_IMAGES is True; clipib needs it False to skip truncated images")
    fp = io.BytesIO(source) if isinstance(source, (bytes, bytearray)) else open(source, "rb")
    with fp, Image.open(fp) as img:
        img.load()
        return img.convert("RGB")


def image_error(exn: BaseException) -> str:
    """Skip reason for an image that failed to decode, without object addresses (stable across runs)."""
    text = re.sub(r"\s*<[^<>]* at 0x[0-9a-f]+>", "", str(exn))
    return f"undecodable image ({type(exn).__name__}: {text})"


def decode_caption(data: Optional[bytes]) -> str:
    """UTF-8 caption from raw bytes; raises ``ValueError`` when missing, empty or not UTF-8."""
    if data is None:
        raise ValueError("missing caption")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exn:
        raise ValueError(f"non-UTF-8 caption ({exn.reason} at byte {exn.start})") from None
    text = text.strip()
    if not text:
        raise ValueError("empty caption")
    return text


def input_size(preprocess: Any) -> Tuple[int, int]:
    """``(H, W)`` of the tensors ``preprocess`` produces, read from its last resize / centre crop."""
    from torchvision.transforms import CenterCrop, Resize

    size: Optional[Tuple[int, int]] = None
    for t in getattr(preprocess, "transforms", []):
        if isinstance(t, CenterCrop):
            size = (int(t.size[0]), int(t.size[1]))
        elif isinstance(t, Resize) and not isinstance(t.size, int) and len(t.size) == 2:
            size = (int(t.size[0]), int(t.size[1]))
    if size is None:
        raise ValueError(f"cannot read the output size of preprocess {type(preprocess).__name__}")
    return size


def load_row(row: Row, preprocess: Preprocess, extras: Optional[Callable[[Row, tuple], Dict[str, Any]]] = None) -> Item:
    """Decode row ``row`` into an item ``{"key", "image", "caption", "matched"[, "similarity"]}`` or a skip marker.

    ``extras(row, (W, H))`` adds fields computed from the original image size (e.g. refcoco's box and
    mask); a ``ValueError``/``KeyError``/``TypeError``/``IndexError`` there makes the row a skip.
    """
    if "skip" in row:
        return skip_item(row["key"], row["skip"])
    try:
        image = decode_image(row["image"])
    except IMAGE_ERRORS as exn:
        return skip_item(row["key"], image_error(exn))
    item = {"key": row["key"], "image": preprocess(image), "caption": row["caption"]}
    item["matched"] = bool(row.get("matched", True))
    if "similarity" in row:  # set by the caption choice / partition: the CLIP score used to select
        item["similarity"] = float(row["similarity"])
    if "run_seeds" in row:  # per-run samples (Selection.resample): the run seeds whose sample holds this pair
        item["run_seeds"] = list(row["run_seeds"])
    try:
        item.update(extras(row, image.size) if extras is not None else {})
    except (ValueError, KeyError, TypeError, IndexError) as exn:
        return skip_item(row["key"], f"bad annotation ({type(exn).__name__}: {exn})")
    return item


class PairDataset(Dataset):
    """Map-style view of a fixed row list; item ``i`` is ``load_row(rows[i], preprocess)`` (never raises on
    bad images). The table sources (:mod:`clipib.data.sources.tables`) build their rows from YAML; this is the
    plain view used for scoring rows and in tests."""

    def __init__(self, rows: List[Row], preprocess: Preprocess) -> None:
        self.rows = rows
        self.preprocess = preprocess

    def __len__(self) -> int:
        """Number of rows, skipped ones included (each is reported once)."""
        return len(self.rows)

    def __getitem__(self, index: int) -> Item:
        """Load row ``index``: ``{"key", "image", "caption", "matched"}`` or ``{"key", "skip"}``."""
        return load_row(self.rows[index], self.preprocess)


class ClipCollate:
    """Collate items into the clipib batch contract; skip markers go to ``batch["skipped"]``.

    Output: ``{"image": FloatTensor[B, 3, H, W], "ids": LongTensor[B, ctx], "key": list[str],
    "caption": list[str], "matched": BoolTensor[B], "skipped": list[{"key", "reason"}]}`` plus
    ``"box"`` FloatTensor[B, 4] when every sample has one, and ``"mask"`` BoolTensor[B, H, W] with
    ``"has_mask"`` BoolTensor[B] when any sample has one (all-False rows where it has none). ``B`` may be
    0 when a whole batch was skipped; ``"skipped"`` is then non-empty. Items that carry ``"ids"`` are not
    re-tokenized; any other field every sample has is passed on (tensors stacked, anything else listed),
    e.g. the shapes world's ``"gold_tokens"`` or ``"run_seeds"`` (per-run samples: list of run-seed lists).
    """

    def __init__(self, tokenizer: Tokenizer, image_size: Tuple[int, int], context_length: Optional[int] = None):
        self.tokenizer = tokenizer
        self.image_size = tuple(image_size)
        self.context_length = context_length or int(getattr(tokenizer, "context_length", 77))

    def __call__(self, items: Sequence[Item]) -> Dict[str, Any]:
        """Stack samples, tokenize captions, list skips."""
        good = [it for it in items if not is_skip(it)]
        batch: Dict[str, Any] = {
            "key": [it["key"] for it in good],
            "caption": [it["caption"] for it in good],
            "matched": torch.tensor([bool(it.get("matched", True)) for it in good], dtype=torch.bool),
            "skipped": [{"key": it["key"], "reason": it["skip"]} for it in items if is_skip(it)],
        }
        if good:
            batch["image"] = torch.stack([it["image"] for it in good])  # [B, 3, H, W]
            if all("ids" in it for it in good):  # the dataset tokenized already (e.g. with gold tokens)
                batch["ids"] = torch.stack([torch.as_tensor(it["ids"]) for it in good]).long()
            else:
                batch["ids"] = self.tokenizer(batch["caption"]).long()  # [B, ctx]
        else:
            batch["image"] = torch.empty(0, 3, *self.image_size)
            batch["ids"] = torch.empty(0, self.context_length, dtype=torch.long)
        if good and all("box" in it for it in good):
            batch["box"] = torch.stack([it["box"] for it in good])  # [B, 4] xyxy, input pixels
        if any("mask" in it for it in good):
            blank = torch.zeros(self.image_size, dtype=torch.bool)
            batch["mask"] = torch.stack([it.get("mask", blank) for it in good])  # [B, H, W]
            batch["has_mask"] = torch.tensor(["mask" in it for it in good], dtype=torch.bool)  # [B]
        extra = set(good[0]) - set(batch) - {"box", "mask"} if good else set()
        for name in sorted(n for n in extra if all(n in it for it in good)):
            values = [it[name] for it in good]  # other fields every sample has: tensors stacked, else a list
            batch[name] = torch.stack([torch.as_tensor(v) for v in values]) if isinstance(values[0], torch.Tensor) else values
        return batch
