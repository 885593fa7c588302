"""Grounding data (RefCOCOg-style) in JSON lines, boxes and masks mapped into the model's input frame.

One JSON object per line::

    {"image": "path/relative/to/image_root.jpg", "expression": "the man on the left",
     "box": [x, y, w, h], "mask": <optional: COCO polygon(s) or RLE>, "id": <optional unique id>}

``"text"``/``"sentence"`` are accepted for ``"expression"``. ``box_format`` says how ``"box"`` reads:
``"xywh"`` (COCO / RefCOCO annotation default: top-left corner + size) or ``"xyxy"`` (corners), in
original-image pixels. Masks: a polygon list ``[[x1, y1, x2, y2, …], …]`` or an RLE
``{"size": [h, w], "counts": [..] | "compressed string"}`` (COCO's column-major run lengths).

Boxes and masks follow the preprocess: resize (shortest side to ``S``, or to a fixed ``(h, w)``) then
centre crop to the input size, read from the transform itself (:class:`ResizeCrop`). Items carry
``"box"`` Tensor[4] (xyxy in input pixels, clipped to the crop) and ``"mask"`` BoolTensor[H, W].
Keys: the line's ``"id"`` when present, else the line number. YAML::

    dataset:
      class_path: clipib.data.sources.refcoco.RefCocoDataset
      init_args: {path: /data/refcocog_umd_val.jsonl, image_root: /data/coco/train2014, box_format: xywh}
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Literal, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw

import clipib.untrusted as untrusted
from clipib.data.common import Row
from clipib.data.sources.rows import RowSource, Selection
from clipib.data.sources.tables import PathLike, image_row, resolve_image

BOX_FORMATS = ("xywh", "xyxy")


@dataclass(frozen=True)
class ResizeCrop:
    """The geometry of an eval preprocess: resize (``size`` int = shortest side, or ``(h, w)``) then
    centre crop to ``crop`` ``(h, w)`` (torchvision's rounding)."""

    size: Union[int, Tuple[int, int]]
    crop: Tuple[int, int]

    @classmethod
    def from_transform(cls, preprocess: Any) -> "ResizeCrop":
        """Read the first ``Resize`` and the ``CenterCrop`` of a torchvision ``Compose``."""
        from torchvision.transforms import CenterCrop, Resize

        size, crop = None, None
        for t in getattr(preprocess, "transforms", []):
            if isinstance(t, Resize) and size is None:
                size = t.size if isinstance(t.size, int) else (t.size[0] if len(t.size) == 1 else tuple(t.size))
            elif isinstance(t, CenterCrop):
                crop = (int(t.size[0]), int(t.size[1]))
            elif type(t).__name__ in ("ResizeKeepRatio", "CenterCropOrPad", "RandomResizedCrop"):
                raise ValueError(f"box mapping does not support the {type(t).__name__} transform")
        if size is None:
            raise ValueError("preprocess has no torchvision Resize; cannot map boxes")
        crop = crop or (size if isinstance(size, tuple) else (size, size))
        return cls(size=size, crop=crop)

    def resized(self, width: int, height: int) -> Tuple[int, int]:
        """``(W', H')`` after the resize (torchvision: shortest side -> size, the other truncated)."""
        if isinstance(self.size, tuple):
            return self.size[1], self.size[0]
        if width <= height:
            return self.size, int(self.size * height / width)
        return int(self.size * width / height), self.size

    def offset(self, width: int, height: int) -> Tuple[int, int]:
        """``(left, top)`` of the centre crop inside the resized image."""
        rw, rh = self.resized(width, height)
        return int(round((rw - self.crop[1]) / 2.0)), int(round((rh - self.crop[0]) / 2.0))

    def map_box(self, box_xyxy: Sequence[float], width: int, height: int) -> torch.Tensor:
        """Box ``[x0, y0, x1, y1]`` in original pixels -> input pixels, clipped to the crop. [4]"""
        rw, rh = self.resized(width, height)
        left, top = self.offset(width, height)
        x0, y0, x1, y1 = (float(v) for v in box_xyxy)
        out = torch.tensor([x0 * rw / width - left, y0 * rh / height - top, x1 * rw / width - left, y1 * rh / height - top])
        limit = torch.tensor([self.crop[1], self.crop[0], self.crop[1], self.crop[0]], dtype=out.dtype)
        return torch.minimum(out.clamp(min=0), limit)

    def map_mask(self, mask: torch.Tensor) -> torch.Tensor:
        """Bool mask ``[h, w]`` at original size -> ``[H, W]`` at input size (nearest resize + crop)."""
        height, width = mask.shape
        rw, rh = self.resized(width, height)
        left, top = self.offset(width, height)
        big = F.interpolate(mask[None, None].float(), size=(rh, rw), mode="nearest-exact")[0, 0]  # [H', W']
        return big[top : top + self.crop[0], left : left + self.crop[1]] > 0.5  # [H, W]


def to_xyxy(box: Sequence[float], box_format: str) -> List[float]:
    """``xywh`` or ``xyxy`` -> ``[x0, y0, x1, y1]``."""
    if box_format not in BOX_FORMATS:
        raise ValueError(f"box_format must be one of {BOX_FORMATS}, got {box_format!r}")
    if len(box) != 4:
        raise ValueError(f"a box needs 4 numbers, got {list(box)}")
    x, y, a, b = (float(v) for v in box)
    return [x, y, x + a, y + b] if box_format == "xywh" else [x, y, a, b]


def _rle_counts(counts: Union[str, List[int]]) -> List[int]:
    """Run lengths of an RLE: a list as is, or COCO's compressed string (6-bit LEB-like, delta-coded)."""
    if not isinstance(counts, str):
        return [int(c) for c in counts]
    out: List[int] = []
    pos = 0
    data = counts.encode("ascii")
    while pos < len(data):
        value, shift, more = 0, 0, True
        while more:
            c = data[pos] - 48
            value |= (c & 0x1F) << (5 * shift)
            more = bool(c & 0x20)
            pos += 1
            shift += 1
            if not more and (c & 0x10):
                value |= -1 << (5 * shift)
        if len(out) > 2:
            value += out[-2]
        out.append(value)
    return out


def decode_mask(spec: Any, width: int, height: int) -> torch.Tensor:
    """Polygon(s) or RLE -> BoolTensor[h, w] at the original image size."""
    if isinstance(spec, dict):
        h, w = (int(v) for v in spec["size"])
        if (h, w) != (height, width):  # an RLE's size is its image's: anything else is wrong (or a memory bomb)
            raise ValueError(f"RLE size {h}x{w} is not the image's {height}x{width}")
        flat = torch.zeros(h * w, dtype=torch.bool)
        pos = 0
        for i, run in enumerate(_rle_counts(spec["counts"])):
            if i % 2:
                flat[pos : pos + run] = True
            pos += run
        return flat.reshape(w, h).T.contiguous()  # column-major -> [h, w]
    polys = spec if spec and isinstance(spec[0], (list, tuple)) else [spec]
    canvas = Image.new("L", (width, height), 0)
    draw = ImageDraw.Draw(canvas)
    for poly in polys:
        draw.polygon([float(v) for v in poly], fill=1, outline=1)
    return torch.frombuffer(bytearray(canvas.tobytes()), dtype=torch.uint8).reshape(height, width).bool()


def read_refcoco(path: PathLike, image_root: Optional[PathLike] = None, box_format: str = "xywh") -> List[Row]:
    """Rows of a grounding JSON-lines file: image, caption (the expression), ``box`` xyxy, ``mask`` spec."""
    path = Path(path)
    root = Path(image_root) if image_root is not None else path.parent
    rows: List[Row] = []
    for i, raw in enumerate(path.read_bytes().splitlines()):
        line = raw.decode("utf-8", "surrogateescape")  # a bad byte fails its caption (a skip), not the file
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
            text = obj.get("expression", obj.get("text", obj.get("sentence")))
            row = image_row(str(obj.get("id", i)), resolve_image(str(obj["image"]), root), None if text is None else str(text))
            row["box"] = to_xyxy(obj["box"], box_format)
        except (ValueError, KeyError, TypeError) as exn:
            detail = untrusted.printable(f"{type(exn).__name__}: {exn}")
            rows.append({"key": str(i), "image": "", "caption": "", "skip": f"malformed line ({detail})"})
            continue
        if obj.get("mask") is not None:
            row["mask"] = obj["mask"]
        rows.append(row)
    return rows


class RefCocoDataset(RowSource):
    """Grounding JSON lines (:func:`read_refcoco`); items also carry ``"box"`` [4] (xyxy, input pixels) and,
    where the line has one, ``"mask"`` [H, W], both mapped through the model's preprocess.

    Args:
        path: the JSON-lines file.
        image_root: folder the ``"image"`` paths are relative to (default: the file's folder).
        box_format: ``"xywh"`` (COCO) or ``"xyxy"``.
        selection: which rows are evaluated (:class:`~clipib.data.sources.rows.Selection`).
    """

    def __init__(self, path: str, image_root: Optional[str] = None, box_format: Literal["xywh", "xyxy"] = "xywh",
                 selection: Optional[Selection] = None) -> None:
        super().__init__(selection)
        self.path, self.image_root, self.box_format = path, image_root, box_format
        self._geometry: Optional[ResizeCrop] = None

    def read_rows(self) -> List[Row]:
        """Rows with ``box`` (xyxy, original pixels) and the ``mask`` spec (key: ``id`` or line number)."""
        return read_refcoco(self.path, self.image_root, box_format=self.box_format)

    def prepare(self, rank: Optional[int], world_size: Optional[int], batch_size: int, num_workers: int) -> None:
        """Read the preprocess geometry (an unsupported transform fails here, not as per-row skips), then rows."""
        self._geometry = ResizeCrop.from_transform(self.need_transforms().preprocess)
        super().prepare(rank, world_size, batch_size, num_workers)

    def extras(self, row: Row, size: tuple) -> Dict[str, Any]:
        """Box (and mask) of ``row`` for an original image of ``size`` = ``(W, H)``, in input pixels."""
        assert self._geometry is not None, "prepare() reads the geometry"
        width, height = size
        out: Dict[str, Any] = {"box": self._geometry.map_box(row["box"], width, height)}
        if "mask" in row:
            out["mask"] = self._geometry.map_mask(decode_mask(row["mask"], width, height))
        return out
