"""The shapes world: determinism, ground truth against drawn pixels, captions, shards, TrainDataModule."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from clipib.data.datamodule import TrainDataModule
from clipib.data.sources.base import ModelTransforms
from clipib.data.sources.synthetic import ShapesDataset
from clipib.data.sources.synthetic.shards import read_shards, write_shards
from clipib.data.sources.synthetic.world import (
    COLOURS, IMAGE_SIZE, MIN_GAP, PAIRS, SHAPES, SIDE_RANGE, TEMPLATES, generate_sample,
)

N = 60  # samples per property check


def _same(a, b) -> bool:
    return (a.caption == b.caption and a.matched == b.matched and a.box == b.box
            and np.array_equal(np.asarray(a.image), np.asarray(b.image)) and np.array_equal(a.mask, b.mask))


def test_determinism_by_seed_and_index() -> None:
    later = [generate_sample(7, i) for i in (9, 3)]  # generated out of order
    assert _same(later[0], generate_sample(7, 9)) and _same(later[1], generate_sample(7, 3))
    assert not _same(generate_sample(7, 3), generate_sample(8, 3))
    assert not _same(generate_sample(7, 3), generate_sample(7, 4))
    ds = ShapesDataset(20, seed=7)
    assert torch.equal(ds[12]["image"], ShapesDataset(20, seed=7)[12]["image"])
    # the image of a pair does not depend on whether it is mismatched
    assert np.array_equal(np.asarray(generate_sample(7, 5, 1.0).image), np.asarray(generate_sample(7, 5).image))


def test_mask_matches_drawn_pixels() -> None:
    for i in range(N):
        s = generate_sample(11, i)
        pix = np.asarray(s.image)  # [H, W, 3]
        is_col = (pix == np.array(COLOURS[s.colour], dtype=np.uint8)).all(-1)  # [H, W]
        x0, y0, x1, y1 = s.box
        assert s.mask.any() and s.mask.shape == (IMAGE_SIZE, IMAGE_SIZE)
        assert is_col[s.mask].all(), "every mask pixel has the target colour"
        assert not s.mask[:y0].any() and not s.mask[y1:].any()
        assert not s.mask[:, :x0].any() and not s.mask[:, x1:].any()
        inside = np.zeros_like(s.mask)
        inside[y0:y1, x0:x1] = True
        assert np.array_equal(is_col & inside, s.mask), "the target's colour in its box is exactly the mask"
        ys, xs = np.nonzero(s.mask)  # every shape touches all four edges of its box
        assert (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1) == s.box


def test_layout_rules() -> None:
    for i in range(N):
        s = generate_sample(3, i)
        assert 1 <= len(s.objects) <= 4
        for k, o in enumerate(s.objects):
            x0, y0, x1, y1 = o.box
            assert x1 - x0 == y1 - y0 and SIDE_RANGE[0] <= x1 - x0 <= SIDE_RANGE[1]
            assert 0 <= x0 and 0 <= y0 and x1 <= IMAGE_SIZE and y1 <= IMAGE_SIZE
            assert o.colour in COLOURS and o.shape in SHAPES
            for p in s.objects[k + 1:]:
                gap = max(p.box[0] - x1, x0 - p.box[2], p.box[1] - y1, y0 - p.box[3])
                assert gap >= MIN_GAP
        bg = np.asarray(s.image).astype(int)
        grey = np.ones((IMAGE_SIZE, IMAGE_SIZE), dtype=bool)
        for o in s.objects:
            grey[o.box[1]:o.box[3], o.box[0]:o.box[2]] = False
        spread = bg[grey].max(-1) - bg[grey].min(-1)  # background is grey + independent channel noise
        assert 0 < spread.mean() < 20 and 150 < bg[grey].mean() < 255


def test_captions_name_unique_or_absent_pair() -> None:
    captions = {t.format(c=c, s=s) for t in TEMPLATES for c, s in PAIRS}
    for i in range(N):
        s = generate_sample(5, i, mismatch_rate=0.5)
        attrs = [(o.colour, o.shape) for o in s.objects]
        assert s.caption in captions and f"{s.colour} {s.shape}" in s.caption
        if s.matched:
            assert attrs.count((s.colour, s.shape)) == 1 and attrs[s.target] == (s.colour, s.shape)
        else:
            assert (s.colour, s.shape) not in attrs and not s.mask.any() and s.target == -1
    rate = np.mean([generate_sample(5, i, mismatch_rate=0.5).matched for i in range(200)])
    assert 0.35 < rate < 0.65
    with pytest.raises(ValueError):
        generate_sample(5, 0, mismatch_rate=1.5)


def test_items_follow_the_batch_contract() -> None:
    ds = ShapesDataset(8, seed=1, split="val", mismatch_rate=0.5)
    ds.use_transforms(ModelTransforms.from_config("clipib-shapes"))
    batch = torch.utils.data.default_collate([ds[i] for i in range(8)])
    assert batch["image"].shape == (8, 3, IMAGE_SIZE, IMAGE_SIZE) and batch["image"].dtype == torch.float32
    assert batch["ids"].dtype == torch.long and batch["gold_tokens"].shape == batch["ids"].shape
    assert batch["mask"].shape == (8, IMAGE_SIZE, IMAGE_SIZE) and batch["mask"].dtype == torch.bool
    assert batch["box"].shape == (8, 4) and batch["matched"].dtype == torch.bool
    assert batch["key"] == [f"shapes-val-{i}" for i in range(8)]
    for i in range(8):  # gold tokens are exactly the colour and shape tokens
        gold = batch["ids"][i][batch["gold_tokens"][i]]
        assert gold.tolist() == [ds.words.word_ids(batch["colour"][i])[0], ds.words.word_ids(batch["shape"][i])[0]]
        assert batch["mask"][i].any() == batch["matched"][i]


def test_mask_and_box_follow_a_resizing_preprocess() -> None:
    def up(image):  # 64 -> 128 px
        t = torch.from_numpy(np.asarray(image, dtype=np.float32)).permute(2, 0, 1)
        return torch.nn.functional.interpolate(t[None], scale_factor=2, mode="nearest")[0]

    ds = ShapesDataset(4, seed=2)
    ds.use_transforms(ModelTransforms(up, ModelTransforms.from_config("clipib-shapes").tokenizer, (128, 128)))
    item, sample = ds[1], generate_sample(2, 1)
    assert item["mask"].shape == (128, 128) and item["mask"].sum() == 4 * sample.mask.sum()
    assert item["box"].tolist() == [2.0 * v for v in sample.box]


def test_shards_round_trip(tmp_path) -> None:
    paths = write_shards(tmp_path, n=7, seed=4, per_shard=3, split="test", mismatch_rate=0.3)
    assert len(paths) == 3 and all((tmp_path / p.split("/")[-1]).is_file() for p in paths)
    rows = list(read_shards(paths))
    assert [r["key"] for r in rows] == [f"shapes-test-{i}" for i in range(7)]
    for i, r in enumerate(rows):
        s = generate_sample(4, i, 0.3, "test")
        assert r["caption"] == s.caption and r["matched"] == s.matched and r["box"] == s.box
        assert np.array_equal(np.asarray(r["image"]), np.asarray(s.image))
        assert np.array_equal(r["mask"], s.mask)
        assert [(o["colour"], o["shape"]) for o in r["meta"]["objects"]] == [(o.colour, o.shape) for o in s.objects]


def test_train_datamodule_splits() -> None:
    with pytest.raises(ValueError, match="distinct seeds"):
        TrainDataModule(train=ShapesDataset(8, seed=1, split="train"), val=ShapesDataset(8, seed=1, split="val"))
    dm = TrainDataModule(train=ShapesDataset(8, seed=0, split="train"), val=ShapesDataset(8, seed=1, split="val"),
                         test=ShapesDataset(8, seed=2, split="test"), batch_size=4, eval_batch_size=8)
    dm.setup("fit")
    dm.use_transforms(ModelTransforms.from_config("clipib-shapes"))  # what the pretrain module hands in setup
    train, val = next(iter(dm.train_dataloader())), next(iter(dm.val_dataloader()))
    assert train["image"].shape[0] == 4 and val["image"].shape[0] == 8 and train["ids"].dtype == torch.long
    assert train["key"][0] == "shapes-train-0" and val["key"][0] == "shapes-val-0"
    assert not torch.equal(dm.splits["train"][0]["image"], dm.splits["test"][0]["image"])


def test_excluded_samples_are_never_generated(monkeypatch) -> None:
    """A resumed run: excluded indices are dropped before generation; the rest keep their keys and order."""
    from clipib.data.sources.synthetic import world

    generated = []
    real = world.generate_sample
    monkeypatch.setattr(world, "generate_sample", lambda seed, i, *a: generated.append(i) or real(seed, i, *a))
    ds = ShapesDataset(6, seed=2, split="test")
    ds.exclude({"shapes-test-1", "shapes-test-4"})
    keys = [ds[i]["key"] for i in range(len(ds))]
    assert keys == ["shapes-test-0", "shapes-test-2", "shapes-test-3", "shapes-test-5"] and generated == [0, 2, 3, 5]
    assert torch.equal(ds[1]["image"], ShapesDataset(6, seed=2)[2]["image"])


def test_minimal_pairs_change_only_the_target_shape() -> None:
    for i in range(0, 20, 2):
        base, twin = generate_sample(9, i, minimal_pairs=True), generate_sample(9, i + 1, minimal_pairs=True)
        assert _same(base, generate_sample(9, i))
        assert [o.box for o in twin.objects] == [o.box for o in base.objects] and twin.target == base.target
        assert (twin.colour == base.colour) != (twin.shape == base.shape) and twin.template == base.template
        attrs = [(o.colour, o.shape) for o in twin.objects]
        assert attrs.count((twin.colour, twin.shape)) == 1
        assert [a for k, a in enumerate(attrs) if k != twin.target] == \
            [(o.colour, o.shape) for k, o in enumerate(base.objects) if k != base.target]
