"""The metric-suite scorers: registered, consistent with their declared names, equal to the kernels, and
driven by AttributionModule.test_step on the tiny model."""
import pytest
import torch

import clipib
from clipib.lit.attribution_module import AttributionModule
from clipib.lit.scorers import SCORERS
from clipib.metrics import confidence_drop, effective_heat_ratio, image_confidence_scores, localization_iou

ALL = {"confidence": {}, "localization": {"q": 0.6}, "pointing_game": {"tolerance": 1}, "ehr": {},
       "insertion_deletion": {"steps": 2}, "text_topk": {"k": 2}, "mismatch_scalars": {}}
TINY = "tests/data/tiny-clip.json"


@pytest.fixture(scope="module")
def batch(pairs):
    images, ids = pairs
    n = images.shape[0]
    mask = torch.zeros(n, *images.shape[-2:], dtype=torch.bool)
    mask[:, 4:12, 8:20] = True
    gold = torch.zeros_like(ids, dtype=torch.bool)
    gold[:, 1] = True
    return {"image": images, "ids": ids, "key": [f"k{i}" for i in range(n)], "caption": [""] * n,
            "mask": mask, "gold_tokens": gold}


def test_scorers_match_names_and_kernels(tiny_clip, batch):
    attr = clipib.METHODS["nib"](tiny_clip).attribute(batch["image"], batch["ids"], modality="both")
    for name, settings in ALL.items():
        scorer = SCORERS[name](**settings)
        for mod in ("image", "text"):
            out = scorer(tiny_clip, batch, attr, mod)
            assert sorted(out) == sorted(scorer.names(mod)), (name, mod)
            assert all(v.shape == (4,) for v in out.values())
    got = SCORERS["localization"](q=0.6)(tiny_clip, batch, attr, "image")["iou"]
    assert torch.equal(got, localization_iou(attr.image, batch["mask"], 0.6))
    got = SCORERS["ehr"]()(tiny_clip, batch, attr, "image")["ehr"]
    assert torch.allclose(got, effective_heat_ratio(attr.image, batch["mask"]), equal_nan=True)
    got = SCORERS["confidence"](protocol="m2ib")(tiny_clip, batch, attr, "image")["image_drop"]
    assert torch.allclose(got, confidence_drop(*image_confidence_scores(tiny_clip, batch["image"], attr.image,
                                                                         batch["ids"], "m2ib")))


def test_missing_ground_truth_and_bad_protocol(tiny_clip, batch):
    attr = clipib.METHODS["nib"](tiny_clip).attribute(batch["image"], batch["ids"], modality="image")
    plain = {k: v for k, v in batch.items() if k not in ("mask", "gold_tokens")}
    with pytest.raises(ValueError, match="batch\\['mask'\\] or batch\\['box'\\]"):
        SCORERS["localization"]()(tiny_clip, plain, attr, "image")
    with pytest.raises(ValueError, match="gold_tokens"):
        SCORERS["text_topk"]()(tiny_clip, plain, attr, "text")
    with pytest.raises(ValueError, match="protocol"):
        SCORERS["confidence"](protocol="hf")


def test_attribution_module_runs_every_metric(batch):
    module = AttributionModule(model=TINY, pretrained=None, methods={"nib": {}}, metrics=ALL, keep_maps=False)
    out = module.test_step(batch, 0)
    assert len(out["records"]) == 4
    summary = module.summary()["nib"]
    for key in ("image_drop", "text_incr", "iou", "pg_iou", "pointing_game", "ehr", "image_deletion",
                "text_insertion", "topk_hit", "image_entropy", "text_mass"):
        assert key in summary and summary[key]["n"] + summary[key]["skipped"] == 4, key


def test_region_uses_the_mask_where_present_else_the_box(tiny_clip, batch):
    attr = clipib.Attribution(image=torch.zeros(4, 32, 32))
    attr.image[:, 0, 0] = 1.0  # the maximum in the top-left pixel
    b = dict(batch, box=torch.tensor([[0.0, 0.0, 4.0, 4.0]] * 4), has_mask=torch.tensor([True, False, True, False]))
    got = SCORERS["pointing_game"]()(tiny_clip, b, attr, "image")["pointing_game"]
    assert got.tolist() == [0.0, 1.0, 0.0, 1.0]  # the masks miss the top-left pixel, the boxes contain it
    no_mask = {k: v for k, v in b.items() if k not in ("mask", "has_mask")}
    assert SCORERS["pointing_game"]()(tiny_clip, no_mask, attr, "image")["pointing_game"].tolist() == [1.0] * 4


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
        "trainer": {"default_root_dir": str(tmp_path / "run"), "logger": False, "enable_progress_bar": False,
                    "callbacks": [{"class_path": "clipib.callbacks.records.RecordWriter"}]},
        "model": {"model": TINY, "pretrained": None, "methods": {"nib": {}}, "metrics": metrics},
        "data": {"kind": "refcoco", "path": str(tmp_path / "ref.jsonl"), "batch_size": 2},  # data.model <- model.model
    }
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(cfg))
    eval_cli(args=["test", "-c", str(tmp_path / "cfg.yaml")])
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())["nib"]
    for key in ("image_drop", "image_incr", "text_drop", "text_incr", "iou", "pg_iou", "pointing_game", "ehr",
                "image_insertion", "image_deletion", "text_insertion", "text_deletion", "image_entropy", "text_mass"):
        assert summary[key]["n"] + summary[key]["skipped"] == 3, key
        assert "std" in summary[key]
