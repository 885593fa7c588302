"""Grounding data: JSON lines parsing, boxes and masks mapped through resize + centre crop."""

from __future__ import annotations

import json
from pathlib import Path
from typing import List

import numpy as np
import open_clip
import pytest
import torch
from PIL import Image
from torchvision import transforms as T

from clipib.data.common import ClipCollate
from clipib.data.sources.base import ModelTransforms
from clipib.data.sources.refcoco import RefCocoDataset, ResizeCrop, decode_mask, read_refcoco, to_xyxy

PLAIN = T.Compose([T.Resize(32, interpolation=T.InterpolationMode.BICUBIC), T.CenterCrop(32), T.ToTensor()])


def picture(path: Path, size, rect) -> Path:
    """White ``size`` = (W, H) image with a black rectangle ``rect`` = (x0, y0, x1, y1)."""
    pixels = np.full((size[1], size[0], 3), 255, dtype=np.uint8)
    x0, y0, x1, y1 = rect
    pixels[y0:y1, x0:x1] = 0
    Image.fromarray(pixels).save(path)
    return path


def dark_bbox(image: torch.Tensor) -> List[int]:
    """xyxy (exclusive end) of the pixels darker than mid-grey in a [3, H, W] tensor in [0, 1]."""
    ys, xs = torch.nonzero(image.mean(0) < 0.5, as_tuple=True)
    return [int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1]


@pytest.mark.parametrize("size,rect", [((80, 40), (36, 10, 52, 30)), ((30, 75), (5, 40, 20, 60)), ((90, 50), (60, 5, 88, 45))])
def test_box_lands_where_the_pixels_go(tmp_path: Path, size, rect) -> None:
    """Non-square images: the mapped box matches the dark rectangle after resize + centre crop."""
    img = Image.open(picture(tmp_path / "p.png", size, rect)).convert("RGB")
    geometry = ResizeCrop.from_transform(PLAIN)
    box = geometry.map_box(rect, *size)
    want = torch.tensor(dark_bbox(PLAIN(img)), dtype=torch.float32)
    assert torch.allclose(box, want, atol=1.0), (box, want)
    assert box[2] <= 32 and box[3] <= 32 and box.min() >= 0


def test_geometry_read_from_open_clip_transforms() -> None:
    g = ResizeCrop.from_transform(open_clip.image_transform(32, is_train=False))
    assert g == ResizeCrop(size=32, crop=(32, 32))
    squash = ResizeCrop.from_transform(open_clip.image_transform(32, is_train=False, resize_mode="squash"))
    assert torch.allclose(squash.map_box([10, 10, 50, 30], 80, 40), torch.tensor([4.0, 8.0, 20.0, 24.0]))
    with pytest.raises(ValueError, match="ResizeKeepRatio"):
        ResizeCrop.from_transform(open_clip.image_transform(32, is_train=False, resize_mode="longest"))


def encode_rle_string(counts: List[int]) -> str:
    """COCO's compressed RLE string (test-side encoder of the documented format)."""
    out = []
    for i, x in enumerate(counts):
        x = x - counts[i - 2] if i > 2 else x
        more = True
        while more:
            c, x = x & 0x1F, x >> 5
            more = x != -1 if c & 0x10 else x != 0
            out.append(chr((c | (0x20 if more else 0)) + 48))
    return "".join(out)


def rle_counts(mask: np.ndarray) -> List[int]:
    flat = mask.T.reshape(-1).astype(int)  # column-major
    counts, current, run = [], 0, 0
    for v in flat:
        if v != current:
            counts.append(run)
            current, run = v, 0
        run += 1
    return counts + [run]


def test_polygon_and_rle_masks_agree() -> None:
    mask = np.zeros((9, 13), dtype=bool)
    mask[2:7, 3:11] = True
    mask[0, 0] = True
    counts = rle_counts(mask)
    for spec in ({"size": [9, 13], "counts": counts}, {"size": [9, 13], "counts": encode_rle_string(counts)}):
        assert torch.equal(decode_mask(spec, 13, 9), torch.from_numpy(mask))
    poly = decode_mask([[3, 2, 10, 2, 10, 6, 3, 6]], 13, 9)
    assert torch.equal(poly, torch.from_numpy(mask & ~(np.arange(9)[:, None] == 0)))


def test_jsonl_items_box_and_mask(tmp_path: Path) -> None:
    picture(tmp_path / "a.png", (80, 40), (36, 10, 52, 30))
    lines = [
        {"id": "ref1", "image": "a.png", "expression": "the black box", "box": [36, 10, 16, 20],
         "mask": [[36, 10, 51, 10, 51, 29, 36, 29]]},
        {"image": "a.png", "text": "same box, corners", "box": [36, 10, 52, 30]},
        {"image": "a.png", "expression": "broken", "box": [1, 2, 3]},
        {"image": "missing.png", "expression": "gone", "box": [0, 0, 1, 1]},
    ]
    (tmp_path / "ref.jsonl").write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    rows = read_refcoco(tmp_path / "ref.jsonl")
    assert rows[0]["box"] == to_xyxy([36, 10, 16, 20], "xywh") == [36.0, 10.0, 52.0, 30.0]
    assert "malformed line" in rows[2]["skip"] and "missing image" in rows[3]["skip"]
    rows_xyxy = read_refcoco(tmp_path / "ref.jsonl", box_format="xyxy")
    assert rows_xyxy[1]["box"] == [36.0, 10.0, 52.0, 30.0]
    data = RefCocoDataset(str(tmp_path / "ref.jsonl"))
    data.use_transforms(ModelTransforms.of(open_clip.image_transform(32, is_train=False), open_clip.get_tokenizer("ViT-B-32")))
    data.prepare(None, None, batch_size=2, num_workers=0)
    items = [data[i] for i in range(len(data))]
    assert items[0]["key"] == "ref1" and items[1]["key"] == "1"
    want = dark_bbox(PLAIN(Image.open(tmp_path / "a.png").convert("RGB")))
    assert torch.allclose(items[0]["box"], torch.tensor(want, dtype=torch.float32), atol=1.0)
    assert dark_bbox(items[0]["mask"][None].repeat(3, 1, 1).logical_not().float()) == want
    batch = ClipCollate(open_clip.get_tokenizer("ViT-B-32"), (32, 32))(items)
    assert tuple(batch["box"].shape) == (2, 4) and tuple(batch["mask"].shape) == (2, 32, 32)
    assert batch["has_mask"].tolist() == [True, False] and len(batch["skipped"]) == 2


def test_collate_keeps_pretokenized_ids_and_extra_fields() -> None:
    tok = open_clip.get_tokenizer("ViT-B-32")
    items = [{"key": str(i), "image": torch.zeros(3, 32, 32), "caption": "a red square", "ids": torch.full((77,), i),
              "gold_tokens": torch.ones(77, dtype=torch.bool), "colour": "red", "matched": torch.tensor(i == 0)} for i in range(2)]
    batch = ClipCollate(tok, (32, 32))(items + [{"key": "bad", "skip": "missing caption"}])
    assert batch["ids"][:, 0].tolist() == [0, 1] and tuple(batch["gold_tokens"].shape) == (2, 77)
    assert batch["colour"] == ["red", "red"] and batch["matched"].tolist() == [True, False]
    assert batch["skipped"] == [{"key": "bad", "reason": "missing caption"}] and "has_mask" not in batch
