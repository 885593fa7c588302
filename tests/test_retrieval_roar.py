"""Retrieval ROAR without retraining (AdaIB App. F; clipib.metrics.retrieval_roar): the retrieval kernel on
hand-made embeddings, the metric against a direct recomputation on the shapes model, the eval CLI (tiny model), and the
ordering oracle > IB method > random on the shipped clipib-shapes model."""
import json

import pytest
import torch
import torch.nn.functional as F

import clipib
from clipib.metrics import METRICS, RetrievalROAR, retrieval_accuracy, retrieval_hits, roar_score
from clipib.metrics.retrieval_roar import SETTINGS, key_hashes
from clipib.removal import content_tokens, remove_image, remove_tokens, top_fraction_mask

TINY = "tests/data/tiny-clip.json"


# ------------------------------------------------------------------------------------------------ kernel

def test_hits_and_accuracy_on_hand_made_embeddings():
    e = torch.eye(4)
    swapped = e[[1, 0, 2, 3]]  # pairs 0 and 1 retrieve each other's partner
    assert retrieval_hits(e, swapped).tolist() == [False, False, True, True]
    assert float(retrieval_accuracy(e, swapped)) == 0.5
    assert float(retrieval_accuracy(e, swapped, top_k=2)) == 1.0
    # pools of 2 in row order: (0, 1) still swapped, (2, 3) right; pools of 3 + 1 ... tensor_split: (0, 1) (2, 3)
    assert float(retrieval_accuracy(e, swapped, pool_size=2)) == 0.5
    near = F.normalize(torch.tensor([[1.0, 0.2, 0, 0], [1.0, 0.1, 0, 0], [0, 0, 1.0, 0], [0, 0, 0, 1.0]]), dim=1)
    # queries 0 and 1 each score the other's partner higher (0.995 > 0.981, 0.196 > 0.100), whatever the chunk;
    # in the pool of pairs 1 and 2 alone, pair 1 finds its partner
    assert retrieval_hits(e, near, chunk=1).tolist() == [False, False, True, True]
    assert float(retrieval_accuracy(e[1:3], near[1:3])) == 1.0
    assert retrieval_hits(e, torch.zeros(4, 4)).all()  # ties favour the partner


def test_roar_score_is_the_relative_drop():
    assert float(roar_score(torch.tensor(0.5), torch.tensor(0.125))) == 0.75
    assert float(roar_score(torch.tensor(0.5), torch.tensor(0.75))) == -0.5  # corruption helped
    assert torch.isnan(roar_score(torch.tensor(0.0), torch.tensor(0.0)))


def test_bad_settings_raise():
    for bad in ({"image_quantile": 1.5}, {"ties": "x"}, {"naming": "x"}, {"text_pool": "x"}, {"pool_size": 1},
                {"image_fill": "grey"}, {"top_k": 0}):
        with pytest.raises(ValueError):
            RetrievalROAR(**bad)


# ------------------------------------------------------------------------------------------------ metric

@pytest.fixture(scope="module")
def shapes():
    """The shipped clipib-shapes model and 32 held-out matched pairs of the shapes world."""
    from clipib.data.sources import ModelTransforms, ShapesDataset

    clip = clipib.load_clip("clipib-shapes")
    ds = ShapesDataset(32, seed=2, split="test", mismatch_rate=0.0)
    ds.use_transforms(ModelTransforms.from_clip(clip))
    return clip, next(iter(torch.utils.data.DataLoader(ds, batch_size=32)))


@pytest.fixture(scope="module")
def roar_batch(shapes):
    """12 pairs (one marked mismatched) and random maps, on the shapes model (retrieval well above chance)."""
    clip, full = shapes
    n = 12
    g = torch.Generator().manual_seed(3)
    batch = {"image": full["image"][:n], "ids": full["ids"][:n], "key": list(full["key"][:n]),
             "matched": torch.arange(n) != 2}
    span = clip.text.span_mask(batch["ids"])
    attr = clipib.Attribution(image=torch.rand(n, *clip.image_size, generator=g),
                              text_raw=torch.rand(batch["ids"].shape, generator=g) * span)
    return clip, batch, attr


def _expected(clip, batch, attr, blank_id=0, model_pool=False):
    """The four settings recomputed from the removal kernels and the model's encoders (matched pairs only)."""
    keep = batch["matched"]
    images, ids = batch["image"][keep], batch["ids"][keep]
    img_map, txt_map = attr.image[keep], attr.text_raw[keep]
    with torch.no_grad():
        e_i, e_t = clip.image.encode(images), clip.text.encode(ids)
        c_i = clip.image.encode(remove_image(images, top_fraction_mask(img_map, quantile=0.75)))
        gone = top_fraction_mask(txt_map, valid=content_tokens(ids), quantile=0.9)
        new = remove_tokens(ids, gone, blank_id)
        c_t = clip.text.encode(new) if model_pool else \
            clip.text.encode_embeddings(clip.text.token_embeddings(new), clip.text.eot_positions(ids))
    order = key_hashes([k for k, m in zip(batch["key"], keep) if m]).argsort()
    e_i, e_t, c_i, c_t = e_i[order], e_t[order], c_i[order], c_t[order]
    acc = {"i2t_oo": retrieval_accuracy(e_i, e_t), "t2i_oo": retrieval_accuracy(e_t, e_i),
           "i2t_oc": retrieval_accuracy(e_i, c_t), "i2t_co": retrieval_accuracy(c_i, e_t),
           "t2i_oc": retrieval_accuracy(e_t, c_i), "t2i_co": retrieval_accuracy(c_t, e_i)}
    return {name: float(roar_score(acc[name[:3] + "_oo"], acc[name])) for name in SETTINGS}


def _run(metric, clip, batch, attr, parts=((0, 12),), seeds=(0,)):
    for s in seeds:
        for a, b in parts:
            sub = {k: v[a:b] for k, v in batch.items()}
            part = clipib.Attribution(image=attr.image[a:b], text_raw=attr.text_raw[a:b])
            for mod in ("image", "text"):
                assert metric.update(clip, sub, part, mod, seed_index=s) == {}  # no per-pair records
    return metric.compute()


def test_metric_equals_the_kernels_recomputed(roar_batch):
    clip, batch, attr = roar_batch
    got = _run(RetrievalROAR(), clip, batch, attr)
    assert 0.3 < got["acc_i2t_oo"]["mean"].item() and 0.3 < got["acc_t2i_oo"]["mean"].item()  # not chance (1/11)
    want = _expected(clip, batch, attr)
    for name, value in want.items():
        assert got[f"roar_{name}"]["mean"].item() == pytest.approx(value), name
        assert got[f"roar_{name}"]["n"].item() == 11  # the mismatched pair is left out
    assert len({round(v, 6) for v in want.values()}) > 1  # the settings differ: a swap would show
    eot = _run(RetrievalROAR(blank_id=49407, text_pool="model"), clip, batch, attr)
    want_eot = _expected(clip, batch, attr, blank_id=49407, model_pool=True)
    for name in ("i2t_oc", "t2i_co"):
        assert eot[f"roar_{name}"]["mean"].item() == pytest.approx(want_eot[name]), name


def test_batches_duplicates_seeds_and_naming(roar_batch):
    clip, batch, attr = roar_batch
    whole = _run(RetrievalROAR(n_seeds=2), clip, batch, attr, seeds=(0, 1))
    # split batches, one pair seen twice (a DistributedSampler pads with repeats): the same pool
    split = _run(RetrievalROAR(n_seeds=2), clip, batch, attr, parts=((0, 5), (4, 12)), seeds=(0, 1))
    for name, stats in whole.items():
        assert torch.allclose(stats["mean"], split[name]["mean"], equal_nan=True), name
        assert stats["std_over_seeds"].item() == 1.0
        assert stats["std"].item() == 0.0  # the same maps for both seeds
    swapped = _run(RetrievalROAR(naming="image_text"), clip, batch, attr)
    assert torch.equal(swapped["roar_t2i_oc"]["mean"], whole["roar_t2i_co"]["mean"])
    assert torch.equal(swapped["roar_i2t_oc"]["mean"], whole["roar_i2t_oc"]["mean"])


def test_an_image_only_method_reports_the_image_settings(roar_batch):
    clip, batch, attr = roar_batch
    metric = RetrievalROAR()
    metric.update(clip, batch, clipib.Attribution(image=attr.image), "image")
    metric.update(clip, batch, clipib.Attribution(image=attr.image), "text")  # no text map: nothing
    assert sorted(k for k in metric.compute() if k.startswith("roar")) == ["roar_i2t_co", "roar_t2i_oc"]
    with pytest.raises(ValueError, match="key"):
        RetrievalROAR().update(clip, {k: v for k, v in batch.items() if k != "key"}, attr, "image")


def test_eval_cli_reports_retrieval_roar_and_refuses_to_resume(tmp_path, capsys):
    import yaml

    from clipib.lit.cli import eval_cli

    cfg = {
        "trainer": {"default_root_dir": str(tmp_path / "run"), "logger": False, "enable_progress_bar": False},
        "model": {"model": TINY, "pretrained": None, "methods": {"random": {}, "oracle": {}}, "seeds": [0, 1],
                  "metrics": {"retrieval_roar": {"pool_size": 4}}},
        "data": {"class_path": "clipib.data.EvalDataModule", "init_args": {"batch_size": 3, "dataset": {
            "class_path": "clipib.data.sources.synthetic.ShapesDataset",
            "init_args": {"size": 8, "seed": 2, "split": "test", "mismatch_rate": 0.0}}}},
    }
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(cfg))
    eval_cli(args=["test", "-c", str(tmp_path / "cfg.yaml")])
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    for method in ("random", "oracle"):
        for name in ("roar_i2t_oc", "roar_i2t_co", "roar_t2i_oc", "roar_t2i_co"):
            assert summary[method][name]["n"] == 8 and "std" in summary[method][name], (method, name)
    assert summary["oracle"]["roar_i2t_co"]["std"] == 0.0  # the oracle's maps do not depend on the seed
    records = (tmp_path / "run" / "records" / "rank0-000.jsonl").read_text().splitlines()
    assert not any("roar" in r for r in records)
    with pytest.raises(ValueError, match="cannot resume"):
        eval_cli(args=["test", "-c", str(tmp_path / "cfg.yaml")])


# ------------------------------------------------------------------------------------------------ ordering

def test_oracle_beats_an_ib_method_beats_random_on_shapes(shapes):
    """Removing the ground-truth object's pixels (the top 25 %) hurts retrieval far more than removing 25 %
    random pixels; M2IB (3 steps) lies between them (32 held-out pairs of the shapes world)."""
    clip, batch = shapes
    n = batch["image"].shape[0]
    scores = {}
    for name, settings in (("oracle", {}), ("random", {}), ("m2ib", {"steps": 3})):
        attr = clipib.METHODS[name](clip, **settings).attribute_batch(batch, "image", seeds=list(range(n)))
        metric = METRICS["retrieval_roar"]()
        metric.update(clip, batch, attr, "image")
        got = metric.compute()
        scores[name] = {k: got[k]["mean"].item() for k in ("roar_i2t_co", "roar_t2i_oc")}
    mean = {name: sum(s.values()) / 2 for name, s in scores.items()}
    assert mean["oracle"] > mean["random"] + 0.5, scores
    assert mean["random"] < mean["m2ib"] < mean["oracle"], scores
    for setting in ("roar_i2t_co", "roar_t2i_oc"):
        assert scores["oracle"][setting] >= scores["m2ib"][setting] > scores["random"][setting], (setting, scores)
