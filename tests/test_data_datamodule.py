"""EvalDataModule over sources, the selection options (fixed-seed sample, mismatched pairs, partition), the
use_model / exclude hand-offs and the unrepeated sampler."""

from __future__ import annotations

import io
import json
import pickle
from collections import Counter
from pathlib import Path
from types import SimpleNamespace
from typing import Callable, List

import numpy as np
import open_clip
import pytest
import torch
import webdataset as wds
from PIL import Image

from clipib.data import CsvDataset, EvalDataModule, Flickr8kDataset, ModelTransforms, Selection, ShardDataset
from clipib.data import UnrepeatedDistributedSampler
from clipib.data.selection import mismatch_rows, partition_bounds, partition_rows, sample_rows

PRE = open_clip.image_transform(32, is_train=False)
TOK = open_clip.get_tokenizer("ViT-B-32")


def module(source, score=None, **kwargs) -> EvalDataModule:
    """An EvalDataModule over ``source`` with the stand-in model's transforms handed (as use_model does)."""
    dm = EvalDataModule(dataset=source, **kwargs)
    dm.use_transforms(ModelTransforms.of(PRE, TOK, score))
    return dm


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


def collect(make: Callable[[], EvalDataModule], world: int) -> tuple:
    """All keys and skips over ``world`` simulated ranks: one DataModule per rank (a process each), a stand-in
    trainer giving the rank / world size."""
    keys, skipped = [], []
    for rank in range(world):
        dm = make()
        dm.trainer = SimpleNamespace(global_rank=rank, world_size=world, lightning_module=None)
        dm.setup("test")
        for batch in dm.test_dataloader():
            assert batch["image"].shape[0] == len(batch["key"]) == batch["ids"].shape[0] == batch["matched"].shape[0]
            keys += batch["key"]
            skipped += [s["key"] for s in batch["skipped"]]
    return keys, skipped


@pytest.mark.parametrize("world,batch_size,workers", [(1, 4, 0), (2, 2, 0), (2, 3, 0), (2, 2, 2)])
def test_datamodule_csv_exactly_once_over_ranks(tmp_path: Path, world: int, batch_size: int, workers: int) -> None:
    path = str(write_csv(tmp_path, 6))
    keys, skipped = collect(lambda: module(CsvDataset(path), batch_size=batch_size, num_workers=workers), world)
    assert sorted(keys, key=int) == [str(i) for i in range(6)] and skipped == ["6"]


def test_datamodule_sample_mismatch_partition_with_score(tmp_path: Path) -> None:
    path = str(write_csv(tmp_path, 12))
    brightness = lambda images, captions: images.mean(dim=(1, 2, 3))  # brighter image = "more similar"
    opts = Selection(sample=9, sample_seed=1, mismatched=True, partition="clean")
    dm = module(CsvDataset(path, selection=opts), score=brightness, batch_size=4)
    keys, skipped = collect(lambda: dm, 1)
    assert len(keys) == 3 and skipped == [] and dm.info["rows"] == 3
    sims = next(iter(dm.test_dataloader()))["similarity"]
    assert len(sims) == 3 and min(sims) >= dm.info["partition_bounds"][1]
    assert all("|" in k for k in keys)
    assert dm.info["partition_bounds"][0] <= dm.info["partition_bounds"][1]
    with pytest.raises(ValueError, match="score"):
        collect(lambda: module(CsvDataset(path, selection=Selection(partition="noisy"))), 1)


def test_datamodule_flickr8k_best_caption_uses_the_handed_scorer(tmp_path: Path) -> None:
    for name, value in (("dark.png", 10), ("light.png", 240)):
        Image.fromarray(np.full((10, 10, 3), value, dtype=np.uint8)).save(tmp_path / name)
    caps = ["dark", "light", "grey", "x", "y"]
    (tmp_path / "en_val.json").write_text(json.dumps([{"image": "dark.png", "caption": caps}, {"image": "light.png", "caption": caps}]))

    def score_pairs(images: torch.Tensor, captions: List[str]) -> torch.Tensor:
        bright = images.mean(dim=(1, 2, 3)) > 0
        return torch.tensor([float(c == ("light" if b else "dark")) for c, b in zip(captions, bright)])

    dm = module(Flickr8kDataset(str(tmp_path / "en_val.json")), score=score_pairs, batch_size=2)
    batch = next(iter(dm.test_dataloader()))
    assert dict(zip(batch["key"], batch["caption"])) == {"dark.png": "dark", "light.png": "light"}
    dm = module(Flickr8kDataset(str(tmp_path / "en_val.json"), caption_choice=2), batch_size=2)
    assert next(iter(dm.test_dataloader()))["caption"] == ["grey", "grey"]


def write_tars(tmp_path: Path) -> List[str]:
    expected = []
    for s in range(3):
        with wds.TarWriter(str(tmp_path / f"{s:05d}.tar")) as sink:
            for i in range(s + 1):
                buf = io.BytesIO()
                Image.fromarray(np.zeros((8, 8, 3), dtype=np.uint8)).save(buf, format="PNG")
                sink.write({"__key__": f"k{i}", "png": buf.getvalue(), "txt": f"t{s}{i}"})
                expected.append(f"{s:05d}/k{i}")
    return expected


def test_datamodule_webdataset_two_ranks(tmp_path: Path) -> None:
    expected = write_tars(tmp_path)
    keys, _ = collect(lambda: module(ShardDataset(str(tmp_path / "{00000..00002}.tar")), batch_size=2), 2)
    assert sorted(keys) == sorted(expected)


@pytest.mark.parametrize("world", [1, 2])
def test_exclude_over_ranks(tmp_path: Path, world: int) -> None:
    """The RecordWriter's hand-off on a resumed run: excluded keys appear in no batch of any rank."""
    expected, path = write_tars(tmp_path), str(write_csv(tmp_path, 6))
    done = {"1", "4", "6"}

    def make(source_cls, spec):
        dm = module(source_cls(spec), batch_size=2)
        dm.exclude(done)
        return dm

    keys, skipped = collect(lambda: make(CsvDataset, path), world)
    assert sorted(keys + skipped) == ["0", "2", "3", "5"]
    keys, _ = collect(lambda: make(ShardDataset, str(tmp_path / "{00000..00002}.tar")), world)
    assert sorted(keys) == sorted(expected)  # shard keys are not in `done`
    done = {str(i) for i in range(7)}  # a finished run resumed: no batch on any rank, and no error
    assert collect(lambda: make(CsvDataset, path), world) == ([], [])


def test_mismatch_leaves_skipped_rows_alone() -> None:
    table = rows(20, skip_every=6)
    mixed = mismatch_rows(table, 0)
    assert all(m is r for m, r in zip(mixed, table) if "skip" in r)
    assert all(m["caption"] != r["caption"] for m, r in zip(mixed, table) if "skip" not in r)


class KeyRecorder:
    """Minimal LightningModule factory: records keys and skips seen in ``test_step``; hands its model in setup."""

    @staticmethod
    def make():
        import lightning.pytorch as pl

        class Recorder(pl.LightningModule):
            def __init__(self) -> None:
                super().__init__()
                self.keys, self.skipped = [], []

            def setup(self, stage: str) -> None:
                self.trainer.datamodule.use_transforms(ModelTransforms.of(PRE, TOK))

            def test_step(self, batch, batch_idx):
                self.keys += batch["key"]
                self.skipped += batch["skipped"]

        return Recorder()


def test_trainer_test_loop_sees_every_key_and_skip(tmp_path: Path) -> None:
    import lightning.pytorch as pl

    dm = EvalDataModule(dataset=CsvDataset(str(write_csv(tmp_path, 5))), batch_size=2)
    recorder = KeyRecorder.make()
    trainer = pl.Trainer(accelerator="cpu", devices=1, logger=pl.loggers.CSVLogger(tmp_path), enable_progress_bar=False,
                         enable_model_summary=False)
    trainer.test(recorder, datamodule=dm, verbose=False)
    assert sorted(recorder.keys) == [str(i) for i in range(5)]
    assert recorder.skipped == [{"key": "5", "reason": f"missing image file {tmp_path / 'missing.png'}"}]


def test_datamodule_is_cli_configurable(tmp_path: Path) -> None:
    """The YAML shape: ``dataset`` chosen by class_path, each source with only its own arguments."""
    from jsonargparse import ArgumentParser

    parser = ArgumentParser(exit_on_error=False)
    parser.add_class_arguments(EvalDataModule, "data")
    config = tmp_path / "data.yaml"
    config.write_text(
        "data:\n  dataset:\n    class_path: clipib.data.sources.refcoco.RefCocoDataset\n"
        "    init_args: {path: r.jsonl, box_format: xyxy, selection: {partition: borderline, partition_thresholds: [0.2, 0.3]}}\n"
        "  batch_size: 4\n")
    cfg = parser.instantiate(parser.parse_path(str(config)))
    dm = cfg.data
    assert dm.batch_size == 4 and dm.dataset.box_format == "xyxy"
    assert dm.dataset.selection.partition_thresholds == (0.2, 0.3)
    with pytest.raises(Exception):
        parser.parse_args(["--data.dataset.class_path=clipib.data.sources.tables.CsvDataset", "--data.dataset.init_args.kind=x"])


def test_missing_model_fails_clearly(tmp_path: Path) -> None:
    dm = EvalDataModule(dataset=CsvDataset(str(write_csv(tmp_path, 2))))
    dm.setup("test")
    with pytest.raises(RuntimeError, match="use_model"):
        dm.test_dataloader()


def test_use_model_hands_the_loaded_models_transforms(tmp_path: Path, tiny_clip) -> None:
    """use_model(clip): the model's own preprocess and input size, its CPU tokenizer, its cosine scorer."""
    from clipib.data.selection import clip_scorer

    dm = EvalDataModule(dataset=CsvDataset(str(write_csv(tmp_path, 9)), selection=Selection(partition="noisy")), batch_size=4)
    dm.setup("test")
    dm.use_model(tiny_clip)
    batch = next(iter(dm.test_dataloader()))
    assert tuple(batch["image"].shape[1:]) == (3, *tiny_clip.image_size) and len(batch["key"]) == 3
    assert torch.equal(batch["ids"], tiny_clip.tokenize(batch["caption"]).cpu())
    assert max(batch["similarity"]) < dm.info["partition_bounds"][0]
    want = torch.nn.functional.cosine_similarity(
        tiny_clip.image.encode(batch["image"]), tiny_clip.text.encode(tiny_clip.tokenize(batch["caption"])))
    assert torch.allclose(clip_scorer(tiny_clip)(batch["image"], batch["caption"]), want, atol=1e-5)
    assert torch.allclose(torch.tensor(batch["similarity"]), want, atol=1e-5)
    shipped = pickle.loads(pickle.dumps(dm.dataset))  # what a spawned DataLoader worker gets: no model inside
    assert shipped.transforms.score is None and shipped[0]["key"] == dm.dataset[0]["key"]


def test_mismatched_both_keeps_originals_and_adds_shuffled() -> None:
    source = CsvDataset("unused.csv", selection=Selection(mismatched="both", mismatch_seed=3))
    rows = [{"key": str(i), "caption": f"c{i}", "image": f"{i}.png", "matched": True} for i in range(5)]
    out = source.select(rows)
    assert len(out) == 10 and sum(r["matched"] for r in out) == 5
    assert len({r["key"] for r in out}) == 10
    assert all(r["caption"] != f"c{r['key'].split('|')[0]}" for r in out if not r["matched"])
