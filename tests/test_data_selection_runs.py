"""Per-run samples (``Selection.resample``) and selection on webdataset shards (the first pass and its manifest):
one sample per run seed, the same pairs from a shard source as from a table with the same rows, and the same
pairs with 1 and 2 processes (gloo on CPU: this file runs itself as the two ranks)."""

from __future__ import annotations

import io
import json
import socket
import subprocess
import sys
from collections import Counter
from pathlib import Path
from typing import Dict, List, Tuple

import numpy as np
import open_clip
import pytest
import torch
import webdataset as wds
from PIL import Image

from clipib.data import CsvDataset, ModelTransforms, Selection, ShardDataset
from clipib.data.selection import draw_seed, sample_rows

PRE = open_clip.image_transform(32, is_train=False)
TOK = open_clip.get_tokenizer("ViT-B-32")
N = 14  # pairs: 5 + 5 + 4 over three shards


def brightness(images: torch.Tensor, captions: List[str]) -> torch.Tensor:
    """Stand-in CLIP score: a brighter image is "more similar" (the caption's length breaks ties)."""
    return images.mean(dim=(1, 2, 3)) + 1e-3 * torch.tensor([len(c) for c in captions], dtype=torch.float)


def _png(value: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.full((8, 10, 3), value, dtype=np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def write_data(root: Path) -> Tuple[str, str]:
    """The same 14 pairs as a CSV (plus one missing file) and as three shards (plus unusable members);
    caption ``"pair <n>"`` names pair n's own image. Returns (csv path, shard pattern)."""
    root.mkdir(parents=True, exist_ok=True)
    lines, n = ["caption,file_path"], 0
    for s, count in enumerate((5, 5, 4)):
        with wds.TarWriter(str(root / f"{s:05d}.tar")) as sink:
            for i in range(count):
                data = _png(17 * n % 256)
                (root / f"{n}.png").write_bytes(data)
                lines.append(f"pair {n},{n}.png")
                sink.write({"__key__": f"m{i}", "png": data, "txt": f"pair {n}"})
                n += 1
            if s == 1:  # unusable members: never sampled (as the table's missing file)
                sink.write({"__key__": "nocaption", "png": _png(3)})
                sink.write({"__key__": "noimage", "txt": "no image here"})
    lines.append("lost,missing.png")
    (root / "pairs.csv").write_text("\n".join(lines) + "\n")
    return str(root / "pairs.csv"), str(root / "{00000..00002}.tar")


def _prepared(source, run_seeds=(0, 1), rank=0, world=1, score=brightness):
    source.use_transforms(ModelTransforms.of(PRE, TOK, score))
    if run_seeds is not None:
        source.use_run_seeds(list(run_seeds))
    source.prepare(rank, world, batch_size=4, num_workers=0)
    return source


def pairs(items) -> Counter:
    """What was evaluated, independent of key spelling: (own caption of the image, caption, matched, run seeds)."""
    out = Counter()
    for it in items:
        if "skip" in it:
            continue
        image = f"pair {int(round(float(it['image'].mean()) * 1e4))}"  # images differ by brightness: an image id
        out[(image, it["caption"], bool(it["matched"]), tuple(it.get("run_seeds", ())))] += 1
    return out


def table_items(path: str, opts: Selection, run_seeds=(0, 1)) -> list:
    source = _prepared(CsvDataset(path, selection=opts), run_seeds)
    return [source[i] for i in range(len(source))]


def shard_items(pattern: str, opts: Selection, folder: Path, run_seeds=(0, 1), rank=0, world=1) -> list:
    return list(_prepared(ShardDataset(pattern, selection=opts, manifest=str(folder)), run_seeds, rank, world))


def test_each_run_seed_draws_its_own_sample(tmp_path: Path) -> None:
    path, _ = write_data(tmp_path)
    source = _prepared(CsvDataset(path, selection=Selection(sample=4, sample_seed=7)), run_seeds=(42, 43, 44))
    per_seed = {s: [r["key"] for r in source.rows if s in r["run_seeds"]] for s in (42, 43, 44)}
    assert all(len(keys) == 4 for keys in per_seed.values())
    assert len({tuple(k) for k in per_seed.values()}) == 3  # three different samples
    assert len(source.rows) == len(set().union(*per_seed.values())) < 12  # the union, each row once
    assert source.info["resampled"] and source.info["run_seeds"] == [42, 43, 44]
    table = CsvDataset(path).read_rows()
    assert per_seed[43] == [r["key"] for r in sample_rows(table, 4, draw_seed(7, 43))]
    fixed = _prepared(CsvDataset(path, selection=Selection(sample=4, sample_seed=7, resample=False)), run_seeds=(42, 43))
    assert [r["key"] for r in fixed.rows] == [r["key"] for r in sample_rows(table, 4, 7)]
    assert all("run_seeds" not in r for r in fixed.rows) and not fixed.info["resampled"]
    both = _prepared(CsvDataset(path, selection=Selection(sample=4, mismatched="both")), run_seeds=(0, 1))
    for s in (0, 1):
        mine = [r for r in both.rows if s in r["run_seeds"]]
        assert sum(r.get("matched", True) is False for r in mine) == 4 and len(mine) == 8  # each run: its 4 pairs + 4 shuffled
        images = {r["key"].split("|")[0] for r in mine}
        assert len(images) == 4  # shuffled within the run's own sample


def test_seed_batch_records_and_std_meaning() -> None:
    from clipib.callbacks.records import finished_keys, std_over  # here: the gloo ranks import this file lean
    from clipib.lit.attribution_module import seed_batch

    batch = {"key": ["a", "b", "c"], "image": torch.arange(3.0)[:, None], "matched": torch.tensor([True, False, True]),
             "caption": ["x", "y", "z"], "run_seeds": [[0], [0, 1], [1]], "skipped": [{"key": "d", "reason": "r"}]}
    part = seed_batch(batch, 1)
    assert part["key"] == ["b", "c"] and part["image"].flatten().tolist() == [1.0, 2.0] and part["skipped"] == []
    assert part["matched"].tolist() == [False, True] and seed_batch(batch, 5) is None
    plain = {k: v for k, v in batch.items() if k != "run_seeds"}
    assert seed_batch(plain, 1) is plain
    records = [{"key": "b", "method": "m", "seed": 0, "run_seeds": [0, 1]},
               {"key": "c", "method": "m", "seed": 1, "run_seeds": [1]},
               {"key": "e", "method": "m", "seed": 0}]  # no run_seeds: needs every seed
    assert finished_keys(records, ["m"], [0, 1]) == {"c"}
    assert std_over(2, {"sample": 4, "resampled": True}).startswith("run seeds") and "own sample of 4" in \
        std_over(2, {"sample": 4, "resampled": True})
    assert std_over(2, {"sample": 4, "resampled": False}).startswith("method noise only")
    assert "fixed sample of 4" in std_over(2, {"sample": 4, "resampled": False})
    assert std_over(1, {}).startswith("samples")


@pytest.mark.parametrize("opts", [
    Selection(sample=6, sample_seed=3, mismatched="both"),
    Selection(sample=8, mismatched=True, partition="clean"),
    Selection(sample=5, resample=False, mismatched=True, mismatch_seed=2),
    Selection(mismatched=True, mismatch_seed=1),
], ids=["sample-both", "sample-mismatch-partition", "fixed-sample", "all-mismatched"])
def test_shard_source_selects_what_the_table_selects(tmp_path: Path, opts: Selection) -> None:
    path, pattern = write_data(tmp_path / "data")
    table = pairs(table_items(path, opts))
    shards = shard_items(pattern, opts, tmp_path / "manifest")
    assert pairs(shards) == table and sum(table.values()) > 0
    again = shard_items(pattern, opts, tmp_path / "manifest")  # a second run reuses the scan parts
    assert pairs(again) == table
    assert len(list((tmp_path / "manifest" / "scan").glob("*.jsonl"))) == 3


def test_shard_selection_needs_a_manifest_folder(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="manifest"):
        ShardDataset(str(tmp_path / "{00000..00001}.tar"), selection=Selection(sample=2))


def test_shard_manifest_image_missing_from_its_shard_is_a_skip(tmp_path: Path) -> None:
    _, pattern = write_data(tmp_path / "data")
    opts = Selection(sample=14, resample=False)
    items = shard_items(pattern, opts, tmp_path / "manifest", run_seeds=None)
    assert len(items) == 14 and not any("skip" in it for it in items)
    with wds.TarWriter(str(tmp_path / "data" / "00002.tar")) as sink:  # shard 2 rewritten without m3
        for i in range(3):
            sink.write({"__key__": f"m{i}", "png": _png(17 * (10 + i) % 256), "txt": f"pair {10 + i}"})
    source = ShardDataset(pattern, selection=opts, manifest=str(tmp_path / "manifest"))
    from clipib.data.manifest import read_lines

    source.rows = list(read_lines(next((tmp_path / "manifest").glob("selection-*.jsonl"))))  # the earlier manifest
    source.use_transforms(ModelTransforms.of(PRE, TOK))
    source.rank, source.world_size = 0, 1
    skips = [it for it in source if "skip" in it]
    assert [s["key"] for s in skips] == ["00002/m3"] and "not found" in skips[0]["skip"]


# ---- 1 process vs 2 processes (gloo) ------------------------------------------------------------------------

OPTS = Selection(sample=8, sample_seed=5, mismatched="both", partition="borderline")


def _run(rank: int, world: int, root: Path, folder: Path) -> Dict[str, object]:
    """Prepare and iterate the shard source as rank ``rank`` of ``world``; what it scanned and yielded."""
    torch.set_num_threads(1)
    scanned: List[int] = []
    source = ShardDataset(str(root / "{00000..00002}.tar"), selection=OPTS, manifest=str(folder))
    real = source.scan_shard
    source.scan_shard = lambda i: scanned.append(i) or real(i)
    _prepared(source, (0, 1), rank, world)
    items = [{"key": it["key"], "caption": it.get("caption"), "run_seeds": it.get("run_seeds"), "skip": it.get("skip")}
             for it in source]
    return {"scanned": scanned, "items": items, "rows": source.rows}


def _worker(rank: int, port: int, root: str, folder: str, out: str) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        Path(out, f"rank{rank}.json").write_text(json.dumps(_run(rank, 2, Path(root), Path(folder))))
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow  # two fresh processes importing clipib (~6 s CPU each)
def test_shard_selection_same_with_one_and_two_processes(tmp_path: Path) -> None:
    write_data(tmp_path / "data")
    port = _free_port()
    procs = [subprocess.Popen([sys.executable, __file__, str(rank), str(port), str(tmp_path / "data"),
                               str(tmp_path / "two"), str(tmp_path)]) for rank in (0, 1)]
    single = _run(0, 1, tmp_path / "data", tmp_path / "one")
    assert [p.wait(timeout=300) for p in procs] == [0, 0]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert single["scanned"] == [0, 1, 2]
    assert ranks[0]["scanned"] == [0, 2] and ranks[1]["scanned"] == [1]  # the first pass split over the ranks
    assert ranks[0]["rows"] == ranks[1]["rows"] == single["rows"]  # one manifest, the single process's
    both = ranks[0]["items"] + ranks[1]["items"]
    key = lambda it: it["key"]  # noqa: E731
    assert sorted(both, key=key) == sorted(single["items"], key=key)  # each pair once over the two ranks
    assert len(single["items"]) > 0 and all(it["skip"] is None for it in both)


if __name__ == "__main__":
    _worker(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4], sys.argv[5])
