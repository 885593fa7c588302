"""Issue 15, gaps 5-7: the published protocols as the paper configs run them.

5. M2IB Table 1's RISE uses 2,048 image / 256 text masks (M2IB Sec. 4.4).
6. The pointing-game IoU scores the box (AdaIB Sec. 5.3), also where a mask exists; RefCOCOg's config has
   Table 2's columns and no AUROC claim.
7. The matched-vs-mismatched AUROC: orientation stated in advance and never flipped, the weighted terms
   f·fit and g·KL, and the plain CLIP-cosine baseline reported once.
"""
from pathlib import Path

import pytest
import torch
import yaml

import clipib
from clipib.lit.attribution_module import AttributionModule
from clipib.metrics import METRICS, mismatch_auroc, pair_cosine, pointing_game_iou, weighted_terms

ROOT = Path(__file__).resolve().parent.parent
PAPER = ROOT / "configs" / "paper"
TINY = str(ROOT / "tests" / "data" / "tiny-clip.json")


def _config(name: str) -> dict:
    return yaml.safe_load((PAPER / f"{name}.yaml").read_text())


# --- gap 5 ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["m2ib_table1_cc", "m2ib_table1_mscxr"])
def test_m2ib_table1_rise_uses_the_papers_mask_counts(name, tiny_clip):
    spec = _config(name)["model"]["methods"]["rise"]
    assert (spec["n_masks"], spec["text_masks"]) == (2048, 256)
    rise = clipib.METHODS["rise"](tiny_clip, **spec)
    grids, offsets = rise.draw_image_masks(torch.Generator().manual_seed(0))
    assert grids.shape[0] == offsets.shape[0] == 2048
    assert rise.draw_token_masks(5, torch.Generator().manual_seed(0)).shape[0] == 256


# --- gap 6 ---------------------------------------------------------------------------------------------------
def _grounding_batch():
    """Two samples, each with a box in the top-left corner and a mask in the bottom-right corner."""
    box = torch.tensor([[0.0, 0.0, 4.0, 4.0]] * 2)
    mask = torch.zeros(2, 8, 8, dtype=torch.bool)
    mask[:, 4:, 4:] = True
    return {"box": box, "mask": mask, "has_mask": torch.tensor([True, True])}


def test_pointing_game_scores_the_box_where_a_mask_also_exists():
    batch = _grounding_batch()
    maps = torch.zeros(2, 8, 8)
    maps[:, :4, :4] = 1.0  # exactly the box
    attr = clipib.Attribution(image=maps)
    by_default = METRICS["pointing_game"]().update(None, batch, attr, "image")
    assert by_default["pg_iou"].tolist() == [1.0, 1.0] and by_default["pointing_game"].tolist() == [1.0, 1.0]
    on_mask = METRICS["pointing_game"](region="mask").update(None, batch, attr, "image")
    assert on_mask["pg_iou"].tolist() == [0.0, 0.0]  # the named option: the mask, which the map misses
    assert torch.equal(by_default["pg_iou"], pointing_game_iou(maps, batch["box"]))
    no_box = {k: v for k, v in batch.items() if k != "box"}  # a mask-only source falls back to its masks
    assert METRICS["pointing_game"]().update(None, no_box, attr, "image")["pg_iou"].tolist() == [0.0, 0.0]
    with pytest.raises(ValueError, match="region"):
        METRICS["pointing_game"](region="polygon")


def test_refcocog_config_has_table2_columns_and_claims_no_auroc():
    cfg = _config("adaib_table2_refcocog")
    metrics = cfg["model"]["metrics"]
    assert metrics["pointing_game"] == {"threshold": 0.5, "region": "box"}
    assert "confidence" in metrics and set(METRICS["confidence"].VALUES) == {"image", "text"}  # vdrop ... tincr
    assert "mismatch_auroc" not in cfg["model"]
    header = (PAPER / "adaib_table2_refcocog.yaml").read_text().split("trainer:")[0]
    assert "not RefCOCOg's" in header  # says where App. C's AUROC is computed instead


# --- gap 7 ---------------------------------------------------------------------------------------------------
def test_orientation_is_stated_and_never_flipped():
    matched = torch.tensor([True, True, False, False])
    reversed_scalar = torch.tensor([0.1, 0.2, 0.8, 0.9])  # points the other way
    assert mismatch_auroc(reversed_scalar, matched, "matched_high").item() == 0.0  # reported, not flipped to 1
    assert mismatch_auroc(reversed_scalar, matched, "matched_low").item() == 1.0
    assert mismatch_auroc(reversed_scalar, matched, "either_optimistic").item() == 1.0  # the named biased option
    with pytest.raises(ValueError, match="either_optimistic"):
        mismatch_auroc(reversed_scalar, matched, "either")


def test_paper_configs_state_every_orientation_in_advance():
    for path in sorted(PAPER.glob("*.yaml")):
        for value, orientation in (yaml.safe_load(path.read_text())["model"].get("mismatch_auroc") or {}).items():
            assert orientation in ("matched_high", "matched_low"), (path.name, value)


def test_weighted_terms_are_products_of_the_scalars():
    s = {"image_f": torch.tensor([2.0, 0.5]), "image_fit": torch.tensor([0.3, 0.1]),
         "image_g": torch.tensor([0.4, 2.0]), "image_kl": torch.tensor([3.0, 1.0]), "text_fit": torch.tensor([1.0])}
    out = weighted_terms(s)
    assert set(out) == {"image_f_fit", "image_g_kl"}  # text has no f / g: nothing derived
    assert torch.allclose(out["image_f_fit"], torch.tensor([0.6, 0.05]))
    assert torch.allclose(out["image_g_kl"], torch.tensor([1.2, 2.0]))


@pytest.fixture(scope="module")
def mismatch_batch(tiny_clip):
    gen = torch.Generator().manual_seed(3)
    captions = ["a red circle", "a blue square", "a green triangle", "a dog", "a cat on a mat", "look"]
    n = len(captions)
    return {"image": torch.randn(n, 3, *tiny_clip.image_size, generator=gen), "ids": tiny_clip.tokenize(captions),
            "key": [f"k{i}" for i in range(n)], "caption": captions,
            "matched": torch.tensor([True, False, True, False, True, False])}


def test_clean_cosine_auroc_is_reported_once(mismatch_batch):
    auroc = {"image_fit": "matched_high", "image_kl": "matched_high", "image_f_fit": "matched_high",
             "image_g_kl": "matched_low"}
    module = AttributionModule(model=TINY, pretrained=None, modality="image", seeds=[0, 1], keep_maps=False,
                               methods={"adaib": {"steps": 1, "copies": 1}, "m2ib": {"steps": 1, "copies": 1}},
                               mismatch_auroc=auroc)
    out = module.test_step(mismatch_batch, 0)
    summary = module.summary()
    cos = pair_cosine(module.clip, mismatch_batch["image"], mismatch_batch["ids"])
    baseline = summary["clip_cosine"]["auroc_clip_cos"]
    assert baseline["mean"] == pytest.approx(mismatch_auroc(cos, mismatch_batch["matched"]).item())
    assert baseline["n"] == 6 and baseline["std"] == 0.0  # each pair once per seed, not once per method
    assert set(summary["clip_cosine"]) == {"auroc_clip_cos"}
    rows = [r for r in out["records"] if r["method"] == "adaib" and r["seed"] == 0]
    assert [r["clip_cos"] for r in rows] == pytest.approx(cos.tolist(), abs=1e-6)
    # the weighted terms are ranked for AdaIB (which has f and g) and absent for M2IB
    f_fit = torch.tensor([r["image_f"] * r["image_fit"] for r in rows], dtype=torch.float64)
    seed0 = mismatch_auroc(f_fit, mismatch_batch["matched"]).item()
    assert {"auroc_image_f_fit", "auroc_image_g_kl", "auroc_image_kl"} <= set(summary["adaib"])
    assert "auroc_image_f_fit" not in summary["m2ib"] and "auroc_image_kl" in summary["m2ib"]
    rows1 = [r for r in out["records"] if r["method"] == "adaib" and r["seed"] == 1]
    seed1 = mismatch_auroc(torch.tensor([r["image_f"] * r["image_fit"] for r in rows1], dtype=torch.float64),
                           mismatch_batch["matched"]).item()
    assert summary["adaib"]["auroc_image_f_fit"]["mean"] == pytest.approx((seed0 + seed1) / 2)
    # a resumed run rebuilds the baseline from the records alone
    again = AttributionModule(model=TINY, pretrained=None, modality="image", seeds=[0, 1], keep_maps=False,
                              methods={"adaib": {"steps": 1, "copies": 1}, "m2ib": {"steps": 1, "copies": 1}},
                              mismatch_auroc=auroc)
    again.resume(out["records"])
    assert again.summary()["clip_cosine"]["auroc_clip_cos"] == pytest.approx(baseline)


def test_baseline_can_be_turned_off_and_its_name_is_reserved(mismatch_batch):
    module = AttributionModule(model=TINY, pretrained=None, modality="image", keep_maps=False,
                               methods={"random": {}}, mismatch_auroc={"image_entropy": "matched_low"},
                               metrics={"mismatch_scalars": {}}, mismatch_baseline=False)
    out = module.test_step(mismatch_batch, 0)
    assert "clip_cosine" not in module.summary() and "clip_cos" not in out["records"][0]
    with pytest.raises(ValueError, match="clip_cosine"):
        AttributionModule(model=TINY, pretrained=None, methods={"clip_cosine": {"method": "random"}})
