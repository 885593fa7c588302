"""Pieces shared by every clipib dataset: bounded decoding, named skip markers, the batch collate.

Every dataset in :mod:`clipib.data` yields *items*: either a sample

    ``{"key": str, "image": Tensor[3, H, W], "caption": str, "matched": bool, ...}``

(``...``: optional ``"box"`` Tensor[4], ``"mask"`` BoolTensor[H, W], ``"caption_truncated": True`` when the
caption was cut to :data:`clipib.untrusted.MAX_CAPTION_CHARS`) or a *skip marker*

    ``{"key": str, "skip": reason}``

for a sample that could not be used. ``reason`` starts with one of the names in :data:`SKIP_REASONS`
(``"undecodable image (UnidentifiedImageError: ...)"``), which :func:`skip_reason` reads back: the run summary
counts skips by that name. Skips travel through the DataLoader like samples, so each is reported exactly once
across ranks and workers; :class:`ClipCollate` separates them into the batch's ``"skipped"`` list.
Images and captions are decoded by :mod:`clipib.untrusted` (bounds, modes, cleaning).
"""

from __future__ import annotations

import os
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

import torch
from PIL import Image
from torch.utils.data import Dataset

import clipib.untrusted as untrusted
from clipib.untrusted import Rejected

Item = Dict[str, Any]
Row = Dict[str, Any]  # a table row: {"key", "image" (path), "caption", ...} or marked {"skip": reason}
Preprocess = Callable[[Image.Image], torch.Tensor]
Tokenizer = Callable[[List[str]], torch.Tensor]
#: ``score(images [B, 3, H, W], captions) -> Tensor[B]``: CLIP similarity of each (image, caption) pair
Score = Callable[[torch.Tensor, List[str]], torch.Tensor]

SKIP_REASONS = (
    "empty image", "image too large", "truncated image", "undecodable image", "missing image file",
    "missing image", "unsafe image path", "missing caption", "empty caption", "non-UTF-8 caption",
    "malformed row", "malformed line", "bad annotation", "no caption", "image could not be scored", "unsafe key",
    "unreadable shard", "image not found in its shard", "member too large",
)
"""The names a skip reason starts with (the summary's ``skipped.by_reason`` keys); anything else counts as
``"other"``."""

#: Errors that mean "this image cannot be decoded" (:class:`clipib.untrusted.Rejected` is a ``ValueError``).
IMAGE_ERRORS = (Rejected, OSError, ValueError, SyntaxError, Image.DecompressionBombError, EOFError)


def skip_item(key: str, reason: str, detail: str = "") -> Item:
    """A skip marker: the sample ``key`` could not be used, for ``reason`` (a name of :data:`SKIP_REASONS`),
    with an optional one-line ``detail``."""
    if skip_reason(reason) != reason:
        raise ValueError(f"unknown skip reason {reason!r}; add it to SKIP_REASONS")
    return {"key": key, "skip": f"{reason} ({detail})" if detail else reason}


def skip_reason(text: str) -> str:
    """The reason name a skip reason text starts with (the longest of :data:`SKIP_REASONS`), else ``"other"``."""
    names = [n for n in SKIP_REASONS if text == n or text.startswith((n + " ", n + ":"))]
    return max(names, key=len) if names else "other"


def is_skip(item: Item) -> bool:
    """Whether ``item`` is a skip marker rather than a sample."""
    return "skip" in item


def decode_image(source: Union[bytes, str, os.PathLike]) -> Image.Image:
    """Open and fully decode an image (bytes or a path) as RGB within bounds (:func:`clipib.untrusted.decode_image`);
    raises :class:`~clipib.untrusted.Rejected` (a ``ValueError``) on empty, oversized, truncated or bad data."""
    return untrusted.decode_image(source)


def image_error(exn: BaseException) -> str:
    """Skip reason for an image that failed to decode, without object addresses (stable across runs)."""
    if isinstance(exn, Rejected):
        return str(exn)
    return f"undecodable image ({type(exn).__name__}: {untrusted._plain(exn)})"


def decode_caption(data: Optional[bytes]) -> str:
    """Clean UTF-8 caption from raw bytes; raises :class:`~clipib.untrusted.Rejected` when missing, empty or not
    UTF-8 (:func:`clipib.untrusted.decode_caption`; an over-long caption is cut without a flag here)."""
    return untrusted.decode_caption(data)[0]


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
        return {"key": row["key"], "skip": row["skip"]}
    problem = untrusted.key_problem(row["key"])
    if problem:
        return skip_item(row["key"], "unsafe key", problem)
    try:
        image = decode_image(row["image"])
    except IMAGE_ERRORS as exn:
        return {"key": row["key"], "skip": image_error(exn)}
    item = {"key": row["key"], "image": preprocess(image), "caption": row["caption"]}
    item["matched"] = bool(row.get("matched", True))
    if row.get("caption_truncated"):
        item["caption_truncated"] = True
    if "similarity" in row:  # set by the caption choice / partition: the CLIP score used to select
        item["similarity"] = float(row["similarity"])
    if "run_seeds" in row:  # per-run samples (Selection.resample): the run seeds whose sample holds this pair
        item["run_seeds"] = list(row["run_seeds"])
    try:
        item.update(extras(row, image.size) if extras is not None else {})
    except (ValueError, KeyError, TypeError, IndexError) as exn:
        return skip_item(row["key"], "bad annotation", f"{type(exn).__name__}: {untrusted.printable(str(exn))}")
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
    "caption": list[str], "matched": BoolTensor[B], "caption_truncated": BoolTensor[B],
    "skipped": list[{"key", "reason"}]}`` plus
    ``"box"`` FloatTensor[B, 4] when every sample has one, and ``"mask"`` BoolTensor[B, H, W] with
    ``"has_mask"`` BoolTensor[B] when any sample has one (all-False rows where it has none). ``B`` may be
    0 when a whole batch was skipped; ``"skipped"`` is then non-empty. Items that carry ``"ids"`` are not
    re-tokenized; any other field every sample has is passed on (tensors stacked, anything else listed),
    e.g. the shapes world's ``"gold_tokens"`` or ``"run_seeds"`` (per-run samples: list of run-seed lists).
    ``"caption_truncated"`` marks captions cut to the tokenizer's context (:func:`token_count`: open_clip's
    BPE tokenizer and its ``HFTokenizer``, SigLIP-family models) or, earlier, to
    :data:`clipib.untrusted.MAX_CAPTION_CHARS`; with any other tokenizer only the character cut is seen.
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
            "caption_truncated": torch.tensor([bool(it.get("caption_truncated")) or self.too_long(it) for it in good],
                                              dtype=torch.bool),
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
        extra = set(good[0]) - set(batch) - {"box", "mask", "caption_truncated"} if good else set()
        for name in sorted(n for n in extra if all(n in it for it in good)):
            values = [it[name] for it in good]  # other fields every sample has: tensors stacked, else a list
            batch[name] = torch.stack([torch.as_tensor(v) for v in values]) if isinstance(values[0], torch.Tensor) else values
        return batch

    def too_long(self, item: Item) -> bool:
        """Whether the tokenizer cuts ``item``'s caption to its context (items that bring ``ids``, or a tokenizer
        :func:`token_count` does not know: never)."""
        if "ids" in item:
            return False
        count = token_count(self.tokenizer, item.get("caption", ""))
        return count is not None and count > self.context_length


def token_count(tokenizer: Any, text: str) -> Optional[int]:
    """How many ids ``tokenizer`` makes of ``text`` before it cuts them to its context, special tokens included
    (``None`` for a tokenizer whose rule is not known here). Duck-typed, as open_clip's tokenizers tokenize:

    * ``SimpleTokenizer`` (has ``encode``, the BPE tokens of the cleaned text): those tokens plus SOT and EOT;
    * ``HFTokenizer`` (a Hugging Face tokenizer in ``.tokenizer``; SigLIP / SigLIP 2): the HF tokenizer's ids of
      ``clean_fn(text)`` with its special tokens (it is called with ``truncation=True, max_length=context``);
      in its ``tokenizer_mode="clips"`` the ids without special tokens plus 3 (BOS, EOS and the class token).
    """
    encode = getattr(tokenizer, "encode", None)
    if callable(encode):
        return len(encode(text)) + 2
    hf = getattr(tokenizer, "tokenizer", None)
    if not callable(getattr(hf, "encode", None)):
        return None
    clean = getattr(tokenizer, "clean_fn", None)
    text = clean(text) if callable(clean) else text
    if getattr(tokenizer, "tokenizer_mode", "") == "clips":
        return len(hf.encode(text, add_special_tokens=False)) + 3
    return len(hf.encode(text, add_special_tokens=True))
