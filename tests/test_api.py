"""The convenience layer: clipib.explain on paths / PIL images / tensors and strings, Attribution.save (PNG, JSON,
escaped HTML), and one clear line, of the right type, raised by clipib, for every wrong input to ``attribute``."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import clipib

SAMPLE = Path(__file__).resolve().parent.parent / "src" / "clipib" / "assets" / "sample.png"


def test_metrics_reachable_after_import():
    assert "localization" in clipib.metrics.METRICS and clipib.METRICS is clipib.metrics.METRICS


def test_explain_takes_paths_pil_arrays_and_tensors(tiny_clip):
    pil = Image.open(SAMPLE).convert("RGB")
    pre = tiny_clip.preprocess(pil)
    inputs = [str(SAMPLE), pil, np.array(pil), torch.from_numpy(np.array(pil)).permute(2, 0, 1), pre]
    attr = clipib.explain(tiny_clip, inputs, "a red circle", method="grad_cam", modality="image")
    assert attr.image.shape == (5, *tiny_clip.image_size) and attr.text is None
    for i in range(1, 5):  # every form gives the model the same pixels, hence the same map
        assert torch.allclose(attr.inputs.images[i], attr.inputs.images[0], atol=1e-5)
        assert torch.allclose(attr.image[i], attr.image[0], atol=1e-5)
    assert attr.inputs.texts == ["a red circle"] * 5 and attr.inputs.tokens[0][1:4] == ["a", "red", "circle"]
    direct = clipib.METHODS["grad_cam"](tiny_clip).attribute(attr.inputs.images, attr.inputs.ids, "image")
    assert torch.allclose(direct.image, attr.image)


def test_explain_settings_go_to_the_method(tiny_clip):
    attr = clipib.explain(tiny_clip, SAMPLE, ["a red circle", "a blue square"], method="nib", steps=2)
    assert attr.inputs.settings["steps"] == 2 and attr.inputs.method == "nib"
    assert attr.image.shape[0] == 2 and attr.text.shape == (2, tiny_clip.context_length)


def test_save_writes_png_json_and_escaped_html(tiny_clip, tmp_path):
    evil = "<script>alert(1)</script>"
    attr = clipib.explain(tiny_clip, SAMPLE, ["a red circle", evil], method="nib", steps=2)
    paths = attr.save(tmp_path / "out")
    assert Image.open(paths["png"]).size[1] > 2 * 128  # one figure per pair, stacked
    saved = json.loads(paths["json"].read_text())
    assert [p["caption"] for p in saved["pairs"]] == ["a red circle", evil]
    assert len(saved["pairs"][1]["token_scores"]) == len(saved["pairs"][1]["tokens"])
    page = paths["html"].read_text()
    assert "<script" not in page and "&lt;script&gt;alert(1)&lt;/script&gt;" in page
    assert page.count("<section>") == 2


def test_save_without_inputs_is_one_line(tiny_clip, pairs, tmp_path):
    images, ids = pairs
    attr = clipib.METHODS["saliency"](tiny_clip).attribute(images, ids, "image")
    with pytest.raises(ValueError, match="clipib.explain") as err:
        attr.save(tmp_path)
    assert "\n" not in str(err.value)


def _cases(clip, images, ids):
    pil = Image.open(SAMPLE)
    return {
        "pil_image": (pil, ids[:1], TypeError, "PngImageFile"),
        "list_of_captions": (images[:2], ["a red circle", "a dog"], TypeError, "list"),
        "float64_images": (images.double(), ids, TypeError, "float64"),
        "float_ids": (images, ids.float(), TypeError, "float32"),
        "one_image_no_batch": (images[0], ids[:1], ValueError, "images[None]"),
        "wrong_size": (torch.nn.functional.interpolate(images, size=(48, 48)), ids, ValueError, "(48, 48)"),
        "grey_channels": (images[:, :1], ids, ValueError, "[4, 1, 32, 32]"),
        "batch_mismatch": (images, ids[:3], ValueError, "equal B"),
        "context_too_long": (images, torch.cat([ids, ids], 1), ValueError, "context"),
    }


@pytest.mark.parametrize("case", ["pil_image", "list_of_captions", "float64_images", "float_ids",
                                  "one_image_no_batch", "wrong_size", "grey_channels", "batch_mismatch",
                                  "context_too_long"])
def test_attribute_bad_input_is_one_clear_line(tiny_clip, pairs, case):
    images, ids = pairs
    bad_images, bad_ids, kind, named = _cases(tiny_clip, images, ids)[case]
    with pytest.raises(kind) as err:
        clipib.NIB(tiny_clip, steps=1).attribute(bad_images, bad_ids)
    message = str(err.value)
    assert "\n" not in message and named in message, message
    raised_in = Path(str(err.traceback[-1].path))
    assert raised_in.name == "base.py" and "clipib" in raised_in.parts, raised_in  # not from inside torch


def test_attribute_bad_seeds(tiny_clip, pairs):
    images, ids = pairs
    with pytest.raises(TypeError, match="seeds must be"):
        clipib.NIB(tiny_clip, steps=1).attribute(images, ids, seeds=0)
    with pytest.raises(TypeError, match="seeds must be ints"):
        clipib.NIB(tiny_clip, steps=1).attribute(images, ids, seeds=[0.5, 1.0, 2.0, 3.0])


@pytest.mark.parametrize("images, texts, kind", [
    (SAMPLE, 3, TypeError), (SAMPLE, ["ok", 7], TypeError), (SAMPLE, "   ", clipib.InputError),
    ("no/such.png", "a cat", clipib.InputError), (3.5, "a cat", TypeError),
    ([SAMPLE] * 2, ["a", "b", "c"], clipib.InputError),
    (torch.zeros(3, 20, 20), "a cat", clipib.InputError),  # float tensors are taken as preprocessed
])
def test_explain_bad_input_is_one_line(tiny_clip, images, texts, kind):
    with pytest.raises(kind) as err:
        clipib.explain(tiny_clip, images, texts, method="saliency")
    assert "\n" not in str(err.value)


def test_seeds_default_is_one_stream_for_every_pair(tiny_clip, pairs):
    """The documented default: without seeds, every pair of a batch draws the same noise stream."""
    images, ids = pairs
    same = torch.cat([images[:1], images[:1]]), torch.cat([ids[:1], ids[:1]])
    rise = clipib.METHODS["rise"](tiny_clip, n_masks=8)
    default = rise.attribute(*same, modality="image")
    assert torch.allclose(default.image[0], default.image[1], atol=1e-4)
    distinct = rise.attribute(*same, modality="image", seeds=[0, 1])
    assert (distinct.image[0] - distinct.image[1]).abs().max() > 0.05
