"""Webdataset shards: round trip, brace patterns, exact node x worker splitting, corrupt members."""

from __future__ import annotations

import io
from collections import Counter
from pathlib import Path
from typing import Dict, List

import numpy as np
import open_clip
import pytest
import webdataset as wds
from PIL import Image
from torch.utils.data import DataLoader

from clipib.data.common import ClipCollate
from clipib.data.sources.base import ModelTransforms
from clipib.data.sources.webdataset import ShardDataset, expand_shards, shard_name

PRE = open_clip.image_transform(32, is_train=False)
TRANSFORMS = ModelTransforms.of(PRE, open_clip.get_tokenizer("ViT-B-32"))


def shards(spec, rank=None, world_size=None, split: str = "auto") -> ShardDataset:
    """A ShardDataset as the DataModule prepares it: the model's transforms handed, the rank given."""
    data = ShardDataset(spec, split=split)
    data.use_transforms(TRANSFORMS)
    data.prepare(rank, world_size, batch_size=2, num_workers=0)
    return data


def jpeg(seed: int, size=(20, 28)) -> bytes:
    """A small random JPEG."""
    pixels = np.random.RandomState(seed).randint(0, 255, (*size, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="JPEG")
    return buf.getvalue()


def write_shards(folder: Path, counts: List[int]) -> Dict[str, str]:
    """Shards ``folder/00000.tar …`` with ``counts[i]`` samples each; returns key -> caption."""
    folder.mkdir(parents=True, exist_ok=True)
    expected = {}
    for s, count in enumerate(counts):
        with wds.TarWriter(str(folder / f"{s:05d}.tar")) as sink:
            for i in range(count):
                caption = f"caption {s} {i} é"
                sink.write({"__key__": f"sample{i:03d}", "jpg": jpeg(100 * s + i), "txt": caption})
                expected[f"{s:05d}/sample{i:03d}"] = caption
    return expected


def test_round_trip(tmp_path: Path) -> None:
    expected = write_shards(tmp_path, [3, 2])
    items = list(shards(str(tmp_path / "{00000..00001}.tar")))
    assert {it["key"]: it["caption"] for it in items} == expected
    assert all(tuple(it["image"].shape) == (3, 32, 32) and it["matched"] for it in items)


def test_brace_patterns_expand() -> None:
    assert expand_shards("d/{00000..00002}.tar") == ["d/00000.tar", "d/00001.tar", "d/00002.tar"]
    assert expand_shards("a/{0..1}.tar::b/x.tar") == ["a/0.tar", "a/1.tar", "b/x.tar"]
    assert expand_shards(["a/{0,2}.tar", "c.tar"]) == ["a/0.tar", "a/2.tar", "c.tar"]
    assert shard_name("pipe:curl -s https://host/laion/01241.tar") == "01241"
    assert shard_name("https://host/x/00007.tar") == "00007"


def test_missing_local_shards_fail_clearly(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="none of the 2 shards"):
        shards(str(tmp_path / "{0..1}.tar"))


def _keys_for(urls: str, rank: int, world: int, workers: int, split: str, monkeypatch) -> List[str]:
    """Keys one rank sees with ``workers`` DataLoader workers, simulated in-process via webdataset's env vars."""
    keys: List[str] = []
    for worker in range(max(workers, 1)):
        monkeypatch.setenv("WORKER", str(worker))
        monkeypatch.setenv("NUM_WORKERS", str(max(workers, 1)))
        keys += [it["key"] for it in shards(urls, rank=rank, world_size=world, split=split)]
    return keys


@pytest.mark.parametrize("counts", [[3, 1, 2], [5]])
@pytest.mark.parametrize("split", ["auto", "shard", "sample"])
@pytest.mark.parametrize("world,workers", [(1, 0), (1, 2), (2, 0), (2, 2)])
def test_every_sample_exactly_once(tmp_path, monkeypatch, counts, split, world, workers) -> None:
    expected = write_shards(tmp_path, counts)
    urls = str(tmp_path / f"{{00000..{len(counts) - 1:05d}}}.tar")
    seen = Counter(k for rank in range(world) for k in _keys_for(urls, rank, world, workers, split, monkeypatch))
    assert set(seen) == set(expected) and max(seen.values()) == 1


def test_real_dataloader_workers_split_exactly(tmp_path: Path) -> None:
    expected = write_shards(tmp_path, [2, 3, 1])
    urls = str(tmp_path / "{00000..00002}.tar")
    collate = ClipCollate(open_clip.get_tokenizer("ViT-B-32"), (32, 32))
    keys: List[str] = []
    for rank in range(2):
        loader = DataLoader(shards(urls, rank=rank, world_size=2), batch_size=2, num_workers=2, collate_fn=collate)
        for batch in loader:
            assert batch["image"].shape[0] == batch["ids"].shape[0] == len(batch["key"])
            keys += batch["key"]
    assert sorted(keys) == sorted(expected)


def corrupt_shard(path: Path) -> None:
    """One shard: 2 good samples, a truncated JPEG, undecodable bytes, no caption, a non-UTF-8 caption."""
    good = jpeg(7)
    with wds.TarWriter(str(path)) as sink:
        sink.write({"__key__": "good0", "jpg": good, "txt": "fine"})
        sink.write({"__key__": "truncated", "jpg": good[: len(good) // 2], "txt": "cut"})
        sink.write({"__key__": "garbage", "jpg": b"\x00 definitely not an image", "txt": "bad"})
        sink.write({"__key__": "nocaption", "jpg": good})
        sink.write({"__key__": "latin1", "jpg": good, "txt": "caf\xe9".encode("latin-1")})
        sink.write({"__key__": "good1", "jpg": jpeg(8), "txt": "also fine"})


def test_corrupt_members_are_skipped_and_named(tmp_path: Path) -> None:
    corrupt_shard(tmp_path / "00000.tar")
    collate = ClipCollate(open_clip.get_tokenizer("ViT-B-32"), (32, 32))
    loader = DataLoader(shards(str(tmp_path / "00000.tar")), batch_size=2, collate_fn=collate)
    keys, skipped = [], {}
    for batch in loader:  # read to the end, no exception
        keys += batch["key"]
        skipped.update({s["key"]: s["reason"] for s in batch["skipped"]})
    assert keys == ["00000/good0", "00000/good1"]
    assert set(skipped) == {"00000/truncated", "00000/garbage", "00000/nocaption", "00000/latin1"}
    assert "truncated" in skipped["00000/truncated"].lower()
    assert "undecodable image" in skipped["00000/garbage"]
    assert skipped["00000/nocaption"] == "missing caption"
    assert "non-UTF-8" in skipped["00000/latin1"]


def test_all_skipped_batch_is_empty_but_shaped(tmp_path: Path) -> None:
    corrupt_shard(tmp_path / "00000.tar")
    collate = ClipCollate(open_clip.get_tokenizer("ViT-B-32"), (32, 32))
    items = [it for it in shards(str(tmp_path / "00000.tar")) if "skip" in it]
    batch = collate(items)
    assert tuple(batch["image"].shape) == (0, 3, 32, 32) and tuple(batch["ids"].shape) == (0, 77)
    assert len(batch["skipped"]) == 4


def test_truncated_tar_and_missing_shard_reported_once(tmp_path: Path) -> None:
    corrupt_shard(tmp_path / "00000.tar")
    data = (tmp_path / "00000.tar").read_bytes()
    (tmp_path / "00001.tar").write_bytes(data[: len(data) // 2])
    items = list(shards(str(tmp_path / "{00000..00002}.tar")))
    shard_skips = [it for it in items if "skip" in it and "/" not in it["key"]]
    assert sorted(it["key"] for it in shard_skips) == ["00001", "00002"]
    assert "unreadable shard" in shard_skips[0]["skip"]


def test_pipe_urls_use_webdatasets_opener(tmp_path: Path) -> None:
    expected = write_shards(tmp_path, [2])
    items = list(shards(f"pipe:cat {tmp_path / '00000.tar'}"))
    assert sorted(it["key"] for it in items) == sorted(expected)


def test_excluded_keys_are_never_decoded(tmp_path: Path, monkeypatch) -> None:
    """A resumed run: excluded samples (and an excluded shard skip) are neither decoded nor yielded."""
    import clipib.data.sources.webdataset as source

    expected = write_shards(tmp_path, [3, 2])
    (tmp_path / "00002.tar").write_bytes(b"not a tar")
    decoded: List[bytes] = []
    real = source.decode_image
    monkeypatch.setattr(source, "decode_image", lambda data: decoded.append(data) or real(data))
    data = ShardDataset(str(tmp_path / "{00000..00002}.tar"))
    data.use_transforms(TRANSFORMS)
    done = {"00000/sample000", "00000/sample002", "00001/sample001", "00002"}
    data.exclude(done)
    data.prepare(None, None, batch_size=2, num_workers=0)
    keys = [it["key"] for it in data]
    assert sorted(keys) == sorted(set(expected) - done) and len(decoded) == len(keys) == 2
