"""eval.py on hostile web data (issue #19): every bad sample one named, counted skip; captions escaped in every
TensorBoard text; nothing written outside the run folder; the summary says what was skipped and why."""

from __future__ import annotations

import io
import json
import os
import re
import subprocess
import sys
import struct
import tarfile
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
TINY = str(ROOT / "tests" / "data" / "tiny-clip.json")
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


SCRIPT = "<script>alert(1)</script>"


def png_header(width: int, height: int) -> bytes:
    """A PNG that declares ``width`` x ``height`` pixels and holds almost none (a decompression bomb's header)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


def _png(seed: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 255, (24, 30, 3), np.uint8)).save(buf, "PNG")
    return buf.getvalue()


SAMPLES = [  # (member key, image bytes, caption bytes, skip reason or None)
    ("xss", _png(0), SCRIPT.encode(), None),
    ("ok", _png(1), b"a photo", None),
    ("long", _png(2), b"a red circle " * 40, None),  # cut to the context: counted
    ("controls", _png(3), b"a\x00 red\x1b circle", None),
    ("rtl", _png(4), "עיגול אדום 🔴".encode(), None),
    ("../../evil", _png(5), b"evil", "unsafe key"),
    ("bomb", png_header(20_000, 20_000), b"bomb", "image too large"),
    ("cut", _png(6)[:80], b"cut", "truncated image"),
    ("zero", b"", b"zero", "empty image"),
    ("noise", np.random.default_rng(7).bytes(3000), b"noise", "undecodable image"),
    ("blank", _png(8), b" \t ", "empty caption"),
    ("latin", _png(9), b"caf\xe9", "non-UTF-8 caption"),
    ("huge", bytes(200_000), b"huge", "member too large"),  # past the run's max_member_bytes: 100,000
]


def _shards(folder: Path) -> str:
    folder.mkdir()
    with tarfile.open(folder / "00000.tar", "w") as tf:
        for key, image, caption, _ in SAMPLES:
            for ext, data in (("png", image), ("txt", caption)):
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(data)
                tf.addfile(info, io.BytesIO(data))
    (folder / "00001.tar").write_bytes(np.random.default_rng(1).bytes(20_000))  # a shard of random bytes
    return str(folder / "{00000..00001}.tar")


def _texts(version: Path) -> list:
    """Every TensorBoard TEXT value under a logger version folder (all runs)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = []
    for run in [version, *[p for p in version.iterdir() if p.is_dir()]]:
        events = EventAccumulator(str(run), size_guidance={"tensors": 0})
        events.Reload()
        for tag in events.Tags()["tensors"]:
            if tag.endswith("text_summary"):
                out += [v.decode() for e in events.Tensors(tag) for v in e.tensor_proto.string_val]
    return out


@pytest.mark.slow
def test_hostile_shards_end_to_end(tmp_path):
    run = tmp_path / "runs" / "hostile"
    cfg = {
        "trainer": {"default_root_dir": str(run), "accelerator": "cpu", "devices": 1,
                    "callbacks": [{"class_path": "clipib.callbacks.gallery.Gallery", "init_args": {"n": 2}}]},
        "model": {"model": TINY, "pretrained": "none", "methods": {"saliency": {}}, "seeds": [0],
                  "metrics": {"similarity": {}}},
        "data": {"class_path": "clipib.data.EvalDataModule", "init_args": {"batch_size": 4, "dataset": {
            "class_path": "clipib.data.sources.webdataset.ShardDataset",
            "init_args": {"shards": _shards(tmp_path / "shards"), "image_exts": ["png"], "max_member_bytes": 100_000}}}},
    }
    (tmp_path / "c.json").write_text(json.dumps(cfg))
    def outside() -> set:
        return {p for p in tmp_path.rglob("*") if p != run and run not in p.parents and p not in run.parents}

    before = outside()
    out = subprocess.run([sys.executable, str(ROOT / "eval.py"), "test", "-c", str(tmp_path / "c.json")],
                         capture_output=True, text=True, env=ENV, cwd=ROOT)
    assert out.returncode == 0, out.stderr[-3000:]

    summary = json.loads((run / "summary.json").read_text())
    expected = {}
    for _, _, _, reason in SAMPLES:
        if reason:
            expected[reason] = expected.get(reason, 0) + 1
    expected["unreadable shard"] = 1
    assert summary["skipped"]["by_reason"] == expected
    assert summary["skipped"]["n"] == sum(expected.values()) == len(summary["skipped"]["samples"])
    assert summary["truncated_captions"] == {"n": 1}
    assert summary["saliency"]["cos"]["n"] == 5  # xss, ok, long, controls, rtl
    records = [json.loads(l) for p in (run / "records").glob("*.jsonl") for l in p.read_text().splitlines()]
    assert [r["key"] for r in records if r.get("caption_truncated")] == ["00000/long"]
    md = (run / "summary.md").read_text()
    assert '"by_reason"' in md and '"samples"' not in md  # the key list stays in summary.json

    # nothing outside the run folder; store members are hashes, not keys
    assert outside() == before
    for store in (run / "attributions").glob("*.tar"):
        with tarfile.open(store) as tf:
            assert all(re.fullmatch(r"[\w-]+\.(json|image\.npy|text\.npy)", n) for n in tf.getnames())

    # every TensorBoard text: the caption shows, escaped; never raw
    texts = _texts(next((run / "tensorboard").glob("version_*")))
    assert texts and not any("<script" in t for t in texts)
    assert any("&lt;script&gt;alert(1)&lt;/script&gt;" in t for t in texts)  # the gallery's caption table
    assert any("by\\_reason" in t or "by_reason" in t for t in texts)  # the summary text states the skips
