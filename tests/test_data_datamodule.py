"""ClipDataModule and its options: fixed-seed sample, mismatched pairs, partition, unrepeated sampler."""

from __future__ import annotations

import io
import json
from collections import Counter
from pathlib import Path
from types import SimpleNamespace
from typing import List

import numpy as np
import open_clip
import pytest
import torch
import webdataset as wds
from PIL import Image

from clipib.data import ClipDataModule, UnrepeatedDistributedSampler
from clipib.data.selection import mismatch_rows, partition_bounds, partition_rows, sample_rows

PRE = open_clip.image_transform(32, is_train=False)
TOK = open_clip.get_tokenizer("ViT-B-32")


def rows(n: int, skip_every: int = 0) -> List[dict]:
    out = [{"key": str(i), "image": f"{i}.png", "caption": f"caption {i}"} for i in range(n)]
    for i in range(0, n, skip_every) if skip_every else ():
        out[i]["skip"] = "missing image file"
    return out


def test_fixed_seed_sample_is_reproducible() -> None:
    table = rows(50, skip_every=7)
    first = [r["key"] for r in sample_rows(table, 10, seed=3)]
    assert first == [r["key"] for r in sample_rows(table, 10, seed=3)]
    assert first != [r["key"] for r in sample_rows(table, 10, seed=4)]
    assert len(set(first)) == 10 and first == sorted(first, key=int)
    assert all("skip" not in r for r in sample_rows(table, 10, seed=3))
    assert len(sample_rows(table, 500, seed=0)) == sum("skip" not in r for r in table)


@pytest.mark.parametrize("n,seed", [(2, 0), (3, 1), (17, 5), (100, 42)])
def test_mismatched_pairs_never_keep_their_caption(n: int, seed: int) -> None:
    table = rows(n)
    mixed = mismatch_rows(table, seed)
    assert all(m["caption"] != r["caption"] and not m["matched"] for m, r in zip(mixed, table))
    assert Counter(m["caption"] for m in mixed) == Counter(r["caption"] for r in table)  # a permutation
    assert mixed == mismatch_rows(table, seed)
    assert all(m["key"].startswith(r["key"] + "|") for m, r in zip(mixed, table))


def test_partition_thirds_and_thresholds() -> None:
    table = rows(9)
    sims = [0.1 * i for i in range(9)]
    parts = {p: [r["key"] for r in partition_rows(table, sims, p)] for p in ("noisy", "borderline", "clean")}
    assert parts == {"noisy": ["0", "1", "2"], "borderline": ["3", "4", "5"], "clean": ["6", "7", "8"]}
    assert [r["key"] for r in partition_rows(table, sims, "clean", (0.15, 0.75))] == ["8"]
    assert partition_bounds([1.0, 2.0], (0.2, 0.3)) == (0.2, 0.3)


@pytest.mark.parametrize("size", [1, 2, 7, 11])
def test_unrepeated_sampler_covers_each_index_once(size: int) -> None:
    per_rank = [list(UnrepeatedDistributedSampler(range(size), num_replicas=2, rank=r)) for r in range(2)]
    assert sorted(per_rank[0] + per_rank[1]) == list(range(size))
    assert [len(UnrepeatedDistributedSampler(range(size), num_replicas=2, rank=r)) for r in range(2)] == [len(p) for p in per_rank]


def write_csv(tmp_path: Path, n: int) -> Path:
    for i in range(n):
        pixels = np.full((12, 20, 3), (20 * i) % 255, dtype=np.uint8)
        Image.fromarray(pixels).save(tmp_path / f"{i}.png")
    lines = ["caption,file_path"] + [f"picture {i},{i}.png" for i in range(n)] + ["lost,missing.png"]
    (tmp_path / "pairs.csv").write_text("\n".join(lines) + "\n")
    return tmp_path / "pairs.csv"


def collect(dm: ClipDataModule, world: int) -> tuple:
    """All keys and skips over ``world`` simulated ranks (a stand-in trainer gives rank / world size)."""
    keys, skipped = [], []
    for rank in range(world):
        dm._dataset = None
        dm.trainer = SimpleNamespace(global_rank=rank, world_size=world, lightning_module=None)
        for batch in dm.test_dataloader():
            assert batch["image"].shape[0] == len(batch["key"]) == batch["ids"].shape[0] == batch["matched"].shape[0]
            keys += batch["key"]
            skipped += [s["key"] for s in batch["skipped"]]
    return keys, skipped


@pytest.mark.parametrize("world,batch_size,workers", [(1, 4, 0), (2, 2, 0), (2, 3, 0), (2, 2, 2)])
def test_datamodule_csv_exactly_once_over_ranks(tmp_path: Path, world: int, batch_size: int, workers: int) -> None:
    dm = ClipDataModule(kind="csv", path=str(write_csv(tmp_path, 6)), batch_size=batch_size, num_workers=workers)
    dm.set_transforms(PRE, TOK)
    keys, skipped = collect(dm, world)
    assert sorted(keys, key=int) == [str(i) for i in range(6)] and skipped == ["6"]


def test_datamodule_sample_mismatch_partition_with_score(tmp_path: Path) -> None:
    dm = ClipDataModule(kind="csv", path=str(write_csv(tmp_path, 12)), sample=9, sample_seed=1,
                        mismatched=True, partition="clean", batch_size=4)
    dm.set_transforms(PRE, TOK)
    dm.score = lambda images, captions: images.mean(dim=(1, 2, 3))  # brighter image = "more similar"
    keys, skipped = collect(dm, 1)
    assert len(keys) == 3 and skipped == [] and dm.info["rows"] == 3
    sims = next(iter(dm.test_dataloader()))["similarity"]
    assert len(sims) == 3 and min(sims) >= dm.info["partition_bounds"][1]
    assert all("|" in k for k in keys)
    assert dm.info["partition_bounds"][0] <= dm.info["partition_bounds"][1]
    dm2 = ClipDataModule(kind="csv", path=str(write_csv(tmp_path, 12)), partition="noisy")
    dm2.set_transforms(PRE, TOK)
    with pytest.raises(ValueError, match="score"):
        collect(dm2, 1)


def test_datamodule_flickr8k_uses_module_score_pairs(tmp_path: Path) -> None:
    for name, value in (("dark.png", 10), ("light.png", 240)):
        Image.fromarray(np.full((10, 10, 3), value, dtype=np.uint8)).save(tmp_path / name)
    caps = ["dark", "light", "grey", "x", "y"]
    (tmp_path / "en_val.json").write_text(json.dumps([{"image": "dark.png", "caption": caps}, {"image": "light.png", "caption": caps}]))

    def score_pairs(images: torch.Tensor, captions: List[str]) -> torch.Tensor:
        bright = images.mean(dim=(1, 2, 3)) > 0
        return torch.tensor([float(c == ("light" if b else "dark")) for c, b in zip(captions, bright)])

    dm = ClipDataModule(kind="flickr8k", path=str(tmp_path / "en_val.json"), batch_size=2)
    dm.set_transforms(PRE, TOK)
    dm.trainer = SimpleNamespace(global_rank=0, world_size=1, lightning_module=SimpleNamespace(score_pairs=score_pairs))
    batch = next(iter(dm.test_dataloader()))
    assert dict(zip(batch["key"], batch["caption"])) == {"dark.png": "dark", "light.png": "light"}


def test_datamodule_webdataset_two_ranks(tmp_path: Path) -> None:
    expected = []
    for s in range(3):
        with wds.TarWriter(str(tmp_path / f"{s:05d}.tar")) as sink:
            for i in range(s + 1):
                buf = io.BytesIO()
                Image.fromarray(np.zeros((8, 8, 3), dtype=np.uint8)).save(buf, format="PNG")
                sink.write({"__key__": f"k{i}", "png": buf.getvalue(), "txt": f"t{s}{i}"})
                expected.append(f"{s:05d}/k{i}")
    dm = ClipDataModule(kind="webdataset", path=str(tmp_path / "{00000..00002}.tar"), batch_size=2)
    dm.set_transforms(PRE, TOK)
    keys, _ = collect(dm, 2)
    assert sorted(keys) == sorted(expected)
    with pytest.raises(ValueError, match="table kind"):
        ClipDataModule(kind="webdataset", path="x.tar", sample=3)


def test_mismatch_leaves_skipped_rows_alone() -> None:
    table = rows(20, skip_every=6)
    mixed = mismatch_rows(table, 0)
    assert all(m is r for m, r in zip(mixed, table) if "skip" in r)
    assert all(m["caption"] != r["caption"] for m, r in zip(mixed, table) if "skip" not in r)


class KeyRecorder:
    """Minimal LightningModule factory: records keys and skips seen in ``test_step``."""

    @staticmethod
    def make():
        import lightning.pytorch as pl

        class Recorder(pl.LightningModule):
            def __init__(self, model: str = "another-model", batch_size: int = 1) -> None:
                super().__init__()
                self.save_hyperparameters()  # keys shared with the datamodule, other values: must not clash
                self.keys, self.skipped = [], []

            def test_step(self, batch, batch_idx):
                self.keys += batch["key"]
                self.skipped += batch["skipped"]

        return Recorder()


def test_trainer_test_loop_sees_every_key_and_skip(tmp_path: Path) -> None:
    import lightning.pytorch as pl

    dm = ClipDataModule(kind="csv", path=str(write_csv(tmp_path, 5)), batch_size=2)
    dm.set_transforms(PRE, TOK)
    module = KeyRecorder.make()
    trainer = pl.Trainer(accelerator="cpu", devices=1, logger=pl.loggers.CSVLogger(tmp_path), enable_progress_bar=False,
                         enable_model_summary=False)
    trainer.test(module, datamodule=dm, verbose=False)
    assert sorted(module.keys) == [str(i) for i in range(5)]
    assert module.skipped == [{"key": "5", "reason": f"missing image file {tmp_path / 'missing.png'}"}]


def test_datamodule_is_cli_configurable() -> None:
    from jsonargparse import ArgumentParser

    parser = ArgumentParser(exit_on_error=False)
    parser.add_class_arguments(ClipDataModule, "data")
    cfg = parser.parse_args(["--data.kind=refcoco", "--data.path=r.jsonl", "--data.box_format=xyxy",
                             "--data.partition=borderline", "--data.partition_thresholds=[0.2,0.3]", "--data.caption_choice=best"])
    dm = ClipDataModule(**vars(cfg.data))
    assert dm.hparams.kind == "refcoco" and dm.hparams.partition_thresholds == (0.2, 0.3)
    with pytest.raises(Exception):
        parser.parse_args(["--data.kind=parquet"])


def test_bad_option_combinations_fail_clearly(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="table kind"):
        ClipDataModule(kind="synthetic", mismatched=True)
    dm = ClipDataModule(kind="csv", path="")
    dm.set_transforms(PRE, TOK)
    with pytest.raises(ValueError, match="path is required"):
        dm.test_dataloader()


def test_partition_with_the_modules_clip(tmp_path: Path, tiny_clip) -> None:
    """No score set: the DataModule scores with the LightningModule's ``clip`` (cosine of the pair)."""
    from clipib.data.selection import clip_scorer

    tiny = str(Path(__file__).parent / "data" / "tiny-clip.json")
    dm = ClipDataModule(kind="csv", path=str(write_csv(tmp_path, 9)), model=tiny, partition="noisy", batch_size=4)
    dm.trainer = SimpleNamespace(global_rank=0, world_size=1, lightning_module=SimpleNamespace(clip=tiny_clip))
    batch = next(iter(dm.test_dataloader()))
    assert tuple(batch["image"].shape[1:]) == (3, *tiny_clip.image_size) and len(batch["key"]) == 3
    assert max(batch["similarity"]) < dm.info["partition_bounds"][0]
    want = torch.nn.functional.cosine_similarity(
        tiny_clip.image.encode(batch["image"]), tiny_clip.text.encode(tiny_clip.tokenize(batch["caption"])))
    assert torch.allclose(clip_scorer(tiny_clip)(batch["image"], batch["caption"]), want, atol=1e-5)
    assert torch.allclose(torch.tensor(batch["similarity"]), want, atol=1e-5)


def test_mismatched_both_keeps_originals_and_adds_shuffled() -> None:
    dm = ClipDataModule(kind="csv", mismatched="both", mismatch_seed=3)
    rows = [{"key": str(i), "caption": f"c{i}", "image": f"{i}.png", "matched": True} for i in range(5)]
    out = dm.select(rows)
    assert len(out) == 10 and sum(r["matched"] for r in out) == 5
    assert len({r["key"] for r in out}) == 10
    assert all(r["caption"] != f"c{r['key'].split('|')[0]}" for r in out if not r["matched"])
