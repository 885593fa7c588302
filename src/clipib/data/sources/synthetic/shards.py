"""The shapes world as webdataset tar shards, with the ground truth stored beside each sample.

Each sample ``<key>`` (``shapes-<split>-<i>``) is written as ``<key>.png`` (the image), ``<key>.txt``
(the caption), ``<key>.mask.png`` (the target's mask, 8-bit 0/255, all 0 for a mismatched pair) and
``<key>.json``: ``{"caption", "colour", "shape", "matched", "box" (xyxy, exclusive x1/y1, image pixels),
"target", "objects": [{"colour", "shape", "box"}], "template", "seed", "index", "split"}``.

>>> import tempfile
>>> with tempfile.TemporaryDirectory() as d:
...     paths = write_shards(d, n=5, seed=3, per_shard=2)
...     rows = list(read_shards(paths))
>>> len(paths), [r["key"] for r in rows] == [f"shapes-test-{i}" for i in range(5)]
(3, True)
"""

from __future__ import annotations

import io
import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import webdataset as wds
from PIL import Image

from clipib.data.sources.synthetic.world import ShapesSample, generate_sample


def _png(image: Image.Image) -> bytes:
    """PNG bytes of a PIL image (lossless, so the pixels round-trip exactly)."""
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def sample_record(sample: ShapesSample, seed: int, index: int, split: str) -> dict[str, object]:
    """The webdataset record (``__key__`` + extensions) of one sample."""
    meta = {
        "caption": sample.caption, "colour": sample.colour, "shape": sample.shape,
        "matched": sample.matched, "box": list(sample.box), "target": sample.target,
        "objects": [{"colour": o.colour, "shape": o.shape, "box": list(o.box)} for o in sample.objects],
        "template": sample.template, "seed": seed, "index": index, "split": split,
    }
    mask = Image.fromarray(sample.mask.astype(np.uint8) * 255, mode="L")
    return {"__key__": sample.key, "png": _png(sample.image), "mask.png": _png(mask),
            "txt": sample.caption.encode("utf-8"), "json": json.dumps(meta).encode("utf-8")}


def write_shards(out_dir: str | Path, n: int, seed: int, per_shard: int = 1000, split: str = "test",
                 mismatch_rate: float = 0.0) -> list[str]:
    """Write samples ``0..n-1`` of ``(seed, split)`` to ``out_dir/shapes-<split>-%06d.tar``; return the paths."""
    if n <= 0 or per_shard <= 0:
        raise ValueError(f"n and per_shard must be positive, got n={n}, per_shard={per_shard}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    pattern = str(out / f"shapes-{split}-%06d.tar")
    with wds.ShardWriter(pattern, maxcount=per_shard, verbose=0) as sink:
        for i in range(n):
            sink.write(sample_record(generate_sample(seed, i, mismatch_rate, split), seed, i, split))
    return [pattern % k for k in range((n + per_shard - 1) // per_shard)]


def read_shards(urls: str | list[str]) -> Iterator[dict[str, object]]:
    """Iterate shard samples in order as ``{"key", "image" (PIL RGB), "caption", "mask" (bool [H, W]),
    "box", "colour", "shape", "matched", "meta" (the full JSON)}``."""
    dataset = wds.WebDataset(urls, shardshuffle=False, empty_check=False).decode("pil")
    for rec in dataset:
        meta = rec["json"]
        yield {
            "key": rec["__key__"], "image": rec["png"].convert("RGB"), "caption": rec["txt"],
            "mask": np.asarray(rec["mask.png"].convert("L")) > 127, "box": tuple(meta["box"]),
            "colour": meta["colour"], "shape": meta["shape"], "matched": meta["matched"], "meta": meta,
        }
