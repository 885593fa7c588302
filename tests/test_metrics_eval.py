"""The eval metrics (``clipib.metrics.METRICS``): registered under their config names, producing the declared
values, equal to their kernels, aggregating over seeds, and driven by AttributionModule.test_step and the
eval CLI on the tiny model."""
import pytest
import torch

import clipib
from clipib.metrics import (
    METRICS,
    AttributionMetric,
    confidence_drop,
    effective_heat_ratio,
    image_confidence_scores,
    localization_iou,
)

ALL = {"confidence": {}, "localization": {"q": 0.6}, "pointing_game": {"tolerance": 1}, "ehr": {},
       "insertion_deletion": {"steps": 2}, "text_topk": {"k": 2}, "mismatch_scalars": {}, "similarity": {},
       "perturbation": {"steps": 2, "road_iters": 3}, "faithfulness_correlation": {"n_subsets": 4},
       "complexity": {}, "relevance_localization": {}}
RERUN = {"model_randomisation": {}, "other_target": {}, "sensitivity": {}, "seed_stability": {}}  # need method=
DATASET = {"retrieval_roar": {"pool_size": 2}}  # dataset-level, no per-pair records (tests/test_retrieval_roar.py)
NAMES = {  # what configs and records rely on
    "confidence": (["image_drop", "image_incr"], ["text_drop", "text_incr"]),
    "localization": (["iou"], []),
    "pointing_game": (["pg_iou", "pointing_game"], []),
    "ehr": (["ehr"], []),
    "insertion_deletion": (["image_insertion", "image_deletion"], ["text_insertion", "text_deletion"]),
    "text_topk": ([], ["topk_share", "topk_hit"]),
    "mismatch_scalars": (["image_mass", "image_entropy"], ["text_mass", "text_entropy"]),
    "similarity": (["cos"], []),
    # metrics that re-run the method (tests/test_metrics_sanity.py covers them)
    "model_randomisation": ([f"image_mprt_{s}_{p}" for p in ("000", "025", "050", "075", "100")
                             for s in ("rho_abs", "rho", "ssim", "topk")],
                            [f"text_mprt_{s}_{p}" for p in ("000", "025", "050", "075", "100") for s in ("rho_abs", "rho")]),
    "other_target": (["image_rl_rho_abs", "image_rl_rho", "image_rl_ssim", "image_rl_topk"],
                     ["text_rl_rho_abs", "text_rl_rho"]),
    "sensitivity": (["image_max_sens", "image_avg_sens"], []),
    "seed_stability": (["image_seed_rho"], ["text_seed_rho"]),
    "perturbation": (["image_morf", "image_lerf", "image_abpc"], ["text_morf", "text_lerf", "text_abpc"]),
    "faithfulness_correlation": (["image_faith_corr"], ["text_faith_corr"]),
    "complexity": (["image_sparseness", "image_complexity"], ["text_sparseness", "text_complexity"]),
    "relevance_localization": (["energy_pg", "rel_mass", "rel_rank", "topk_inter", "mask_auroc"], []),
    "retrieval_roar": ([], []),  # reports roar_<setting> / acc_<setting> in the summary only
}
TINY = "tests/data/tiny-clip.json"


@pytest.fixture(scope="module")
def batch(labelled_batch):
    """The tiny pairs with an object box, a gold token and matched flags (tests/conftest.py)."""
    return labelled_batch


@pytest.fixture(scope="module")
def attr(tiny_clip, batch):
    return clipib.METHODS["nib"](tiny_clip).attribute(batch["image"], batch["ids"], modality="both")


def test_registry_names_and_settings():
    assert set(METRICS) == set(NAMES)
    for name, (image, text) in NAMES.items():
        metric = METRICS[name](n_seeds=2, **{**ALL, **RERUN, **DATASET}[name])
        assert isinstance(metric, AttributionMetric)
        assert (metric.value_names("image"), metric.value_names("text")) == (image, text), name
    with pytest.raises(ValueError, match="modality"):
        METRICS["ehr"]().value_names("audio")


def test_metrics_match_names_and_kernels(tiny_clip, batch, attr):
    for name, settings in ALL.items():
        metric = METRICS[name](**settings)
        for mod in ("image", "text"):
            out = metric.update(tiny_clip, batch, attr, mod)
            assert list(out) == metric.value_names(mod), (name, mod)
            assert all(v.shape == (4,) for v in out.values())
        summary = metric.compute()
        assert sorted(summary) == sorted(metric.value_names("image") + metric.value_names("text"))
        assert all(s["n"] + s["skipped"] == 4 for s in summary.values()), name
    got = METRICS["localization"](q=0.6).update(tiny_clip, batch, attr, "image")["iou"]
    assert torch.equal(got, localization_iou(attr.image, batch["mask"], 0.6))
    got = METRICS["ehr"]().update(tiny_clip, batch, attr, "image")["ehr"]
    assert torch.allclose(got, effective_heat_ratio(attr.image, batch["mask"]), equal_nan=True)
    got = METRICS["confidence"](protocol="m2ib").update(tiny_clip, batch, attr, "image")["image_drop"]
    assert torch.allclose(got, confidence_drop(*image_confidence_scores(tiny_clip, batch["image"], attr.image,
                                                                         batch["ids"], "m2ib")))
    got = METRICS["similarity"]().update(tiny_clip, batch, attr, "image")["cos"]
    assert torch.allclose(got, tiny_clip.similarity(batch["image"], batch["ids"]), atol=1e-6)


def test_seeds_and_replayed_records(tiny_clip, batch, attr):
    """``add`` of the values ``update`` returned reproduces the summary (a resumed run replays its records);
    two seeds report the std over the per-seed means."""
    live = METRICS["localization"](n_seeds=2)
    replay = METRICS["localization"](n_seeds=2)
    shifted = clipib.Attribution(image=attr.image.flip(-1))
    for seed, a in enumerate((attr, shifted)):
        replay.add(live.update(tiny_clip, batch, a, "image", seed_index=seed), seed_index=seed)
    s, r = live.compute()["iou"], replay.compute()["iou"]
    assert all(torch.equal(s[k], r[k]) for k in s)
    per_seed = torch.stack([localization_iou(a.image, batch["mask"]).mean() for a in (attr, shifted)])
    assert s["mean"].item() == pytest.approx(per_seed.mean().item())
    assert s["std"].item() == pytest.approx(per_seed.std().item()) and s["std_over_seeds"].item() == 1.0
    assert s["n"].item() == 4


def test_missing_ground_truth_and_bad_settings(tiny_clip, batch):
    attr = clipib.METHODS["nib"](tiny_clip).attribute(batch["image"], batch["ids"], modality="image")
    plain = {k: v for k, v in batch.items() if k not in ("mask", "gold_tokens")}
    for name in ("localization", "pointing_game", "ehr"):
        with pytest.raises(ValueError, match="batch\\['mask'\\] or batch\\['box'\\]"):
            METRICS[name]().update(tiny_clip, plain, attr, "image")
    with pytest.raises(ValueError, match="gold_tokens"):
        METRICS["text_topk"]().update(tiny_clip, plain, attr, "text")
    with pytest.raises(ValueError, match="protocol"):
        METRICS["confidence"](protocol="hf")
    with pytest.raises(ValueError, match="Unexpected keyword"):
        METRICS["localization"](quantile=0.5)


def test_region_uses_the_mask_where_present_else_the_box(tiny_clip, batch):
    attr = clipib.Attribution(image=torch.zeros(4, 32, 32))
    attr.image[:, 0, 0] = 1.0  # the maximum in the top-left pixel
    b = dict(batch, box=torch.tensor([[0.0, 0.0, 4.0, 4.0]] * 4), has_mask=torch.tensor([True, False, True, False]))
    got = METRICS["pointing_game"](region="mask").update(tiny_clip, b, attr, "image")["pointing_game"]
    assert got.tolist() == [0.0, 1.0, 0.0, 1.0]  # the masks miss the top-left pixel, the boxes contain it
    assert METRICS["localization"]().update(tiny_clip, b, attr, "image")["iou"][1] > 0  # localization: same rule
    # AdaIB's pointing game (the default) scores the box even where a mask exists
    assert METRICS["pointing_game"]().update(tiny_clip, b, attr, "image")["pointing_game"].tolist() == [1.0] * 4
    no_mask = {k: v for k, v in b.items() if k not in ("mask", "has_mask")}
    on_mask = METRICS["pointing_game"](region="mask").update(tiny_clip, no_mask, attr, "image")
    assert on_mask["pointing_game"].tolist() == [1.0] * 4


def test_attribution_module_runs_every_metric(batch):
    from clipib.lit.attribution_module import AttributionModule

    module = AttributionModule(model=TINY, pretrained=None, methods={"nib": {}, "oracle": {}}, metrics=ALL,
                               keep_maps=False)
    out = module.test_step(batch, 0)
    assert len(out["records"]) == 8
    summary = module.summary()["nib"]
    for key in ("image_drop", "text_incr", "iou", "pg_iou", "pointing_game", "ehr", "image_deletion",
                "text_insertion", "topk_hit", "image_entropy", "text_mass", "image_abpc", "text_faith_corr",
                "image_sparseness", "mask_auroc"):
        assert key in summary and summary[key]["n"] + summary[key]["skipped"] == 4, key
    oracle = module.summary()["oracle"]  # the module hands the oracle the batch (Attributor.attribute_batch)
    assert oracle["mask_auroc"]["mean"] == 1.0 and oracle["energy_pg"]["mean"] == 1.0


def test_eval_cli_reports_the_metric_suite(tmp_path):
    """``eval.py test -c <config>`` on a grounding table: every selected metric lands in summary.json."""
    import json

    import yaml
    from PIL import Image, ImageDraw

    from clipib.lit.cli import eval_cli

    lines = []
    for i in range(3):
        im = Image.new("RGB", (48, 40), (200, 200, 200))
        ImageDraw.Draw(im).rectangle([10 + 3 * i, 8, 30 + 3 * i, 28], fill=(220, 40, 40))
        im.save(tmp_path / f"{i}.png")
        lines.append({"id": f"r{i}", "image": f"{i}.png", "expression": "a red square", "box": [10 + 3 * i, 8, 21, 21]})
    (tmp_path / "ref.jsonl").write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    metrics = {"confidence": {"protocol": "m2ib"}, "localization": {}, "pointing_game": {}, "ehr": {},
               "insertion_deletion": {"steps": 2}, "mismatch_scalars": {}}
    cfg = {
        # an older config listing RecordWriter: it replaces the CLI's default one (records written once)
        "trainer": {"default_root_dir": str(tmp_path / "run"), "logger": False, "enable_progress_bar": False,
                    "callbacks": [{"class_path": "clipib.callbacks.records.RecordWriter"}]},
        "model": {"model": TINY, "pretrained": None, "methods": {"nib": {}}, "metrics": metrics},
        "data": {"class_path": "clipib.data.EvalDataModule", "init_args": {"batch_size": 2, "dataset": {
            "class_path": "clipib.data.sources.refcoco.RefCocoDataset", "init_args": {"path": str(tmp_path / "ref.jsonl")}}}},
    }
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(cfg))
    eval_cli(args=["test", "-c", str(tmp_path / "cfg.yaml")])
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())["nib"]
    assert len((tmp_path / "run" / "records" / "rank0-000.jsonl").read_text().splitlines()) == 3
    assert not list((tmp_path / "run" / "records").glob("rank0-001.jsonl"))
    for key in ("image_drop", "image_incr", "text_drop", "text_incr", "iou", "pg_iou", "pointing_game", "ehr",
                "image_insertion", "image_deletion", "text_insertion", "text_deletion", "image_entropy", "text_mass"):
        assert summary[key]["n"] + summary[key]["skipped"] == 3, key
        assert "std" in summary[key]
