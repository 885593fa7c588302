"""One contract test for every registered method (``clipib.METHODS``): methods added later are covered too.

Shapes and ranges, text 0 outside SOT..EOT, same seed same result, a batch of 4 equals four single calls,
``METHODS[name](clip)`` builds with its defaults, and ``clipib explain --method NAME`` runs on the tiny model.
"""

import json
import math
import time

import pytest
import torch

import clipib
from clipib.cli import main

SAMPLE = "src/clipib/assets/sample.png"
NAMES = sorted(name for name, cls in clipib.METHODS.items() if not cls.NEEDS_BATCH)
"""Every method but those that need the eval batch (``oracle``: its maps are the batch's ground truth, so it has no
``attribute(images, ids)`` - it raises - and no ``clipib explain``; tests/test_metrics_faithfulness.py covers it)."""
FAST = {
    "m2ib": dict(steps=3, copies=2),
    "adaib": dict(steps=3, copies=2),
    "nib": dict(steps=4),
    "kernel_shap": dict(n_samples=64),
    "rise": dict(n_masks=64, text_masks=32),
    "mfaba": dict(steps=5),
    "integrated_gradients": dict(steps=8),
    "input_iba": dict(steps=3, text_steps=3, copies=2, feat_steps=2, gan_epochs=1, gan_samples=4, gan_batch=2),
}
"""Small settings per method, so the contract runs in seconds; a method not listed runs with its defaults."""
BATCH_REL = 1e-2
"""Batch vs single tolerance, relative to each map's largest magnitude: NIB's tiny-model maps (~1e-6) differ
by ~1e-3 of their scale between batch shapes (float summation order); a pair that saw another pair's noise
or a batch-size factor differs by O(1)."""


FAMILY_REL = 5e-2
"""Batch vs single on the SigLIP-style model: NIB's text maps there are ~1e-7 (a random bidirectional tower
whose cosine barely moves along NIB's path) and differ by ~2 % of that between batch shapes; a pair that
saw another pair's data still differs by O(1)."""
SCALAR_FLOOR = 1e-6
"""Absolute floor for scalars: IG's convergence delta on the tiny SigLIP-style model is ~3e-7, float rounding
whose batch-shape noise is a few % of itself."""


def _modalities(cls) -> tuple:
    return tuple(m for m in ("image", "text") if m in cls.modalities)


def _modality(cls) -> str:
    mods = _modalities(cls)
    return "both" if len(mods) == 2 else mods[0]


def _close(a: torch.Tensor, b: torch.Tensor, rel: float, floor: float = 0.0) -> None:
    """``a ≈ b`` up to ``rel`` times the larger magnitude of the two maps (some methods are float-noisy), and
    at least ``floor``."""
    scale = max(float(a.abs().max()), float(b.abs().max()), 1e-12)
    torch.testing.assert_close(a, b, rtol=rel, atol=max(rel * scale, floor))


class _Results(dict):
    """``name -> (method, batch result with seeds 3..6, seconds)``, computed on first use (a failing method
    fails its own tests only)."""

    def __init__(self, clip, pairs) -> None:
        super().__init__()
        self.clip, self.pairs = clip, pairs

    def __missing__(self, name: str):
        images, ids = self.pairs
        cls = clipib.METHODS[name]
        method = cls(self.clip, **FAST.get(name, {}))
        start = time.perf_counter()
        attr = method.attribute(images, ids, modality=_modality(cls), seeds=[3, 4, 5, 6])
        self[name] = (method, attr, time.perf_counter() - start)
        return self[name]


@pytest.fixture(scope="module")
def results(tiny_clip, pairs) -> _Results:
    """One batch run per method, shared by the tests below."""
    return _Results(tiny_clip, pairs)


FAMILY = "siglip"
"""The tower family every method also runs on: a timm ViT with a MAP head (no class token) and a bidirectional
text tower pooled at the last position (SigLIP's shape), on SigLIP-shaped synthetic ids."""


@pytest.fixture(scope="module")
def family_results(tiny_family, family_pairs) -> _Results:
    """:class:`_Results` on the tiny SigLIP-style model."""
    clip = tiny_family(FAMILY)
    return _Results(clip, family_pairs(clip))


COCA = "coca"
"""CoCa's contrastive towers: an attentional pooler on the image side, a causal text tower that masks padding
and pools a class token appended after the context (the stream is one row longer than the ids)."""


@pytest.fixture(scope="module")
def coca_results(tiny_family, family_pairs) -> _Results:
    """:class:`_Results` on the tiny CoCa model."""
    clip = tiny_family(COCA)
    return _Results(clip, family_pairs(clip))


def test_registry_names():
    assert {"m2ib", "nib", "adaib"} <= set(NAMES)
    for name in sorted(clipib.METHODS):
        cls = clipib.METHODS[name]
        assert cls.name == name and issubclass(cls, clipib.Attributor) and _modalities(cls)


@pytest.mark.parametrize("name", NAMES)
def test_default_constructor(tiny_clip, name):
    method = clipib.METHODS[name](tiny_clip)
    assert isinstance(method, clipib.Attributor) and method.clip is tiny_clip


def _which(model, tiny_clip, pairs, results, family_results, coca_results=None):
    if model == "tiny":
        return tiny_clip, pairs, results
    other = coca_results if model == COCA else family_results
    return other.clip, other.pairs, other


@pytest.mark.parametrize("model", ["tiny", FAMILY, COCA])
@pytest.mark.parametrize("name", NAMES)
def test_shapes_ranges_and_masking(tiny_clip, pairs, results, family_results, coca_results, name, model):
    tiny_clip, pairs, results = _which(model, tiny_clip, pairs, results, family_results, coca_results)
    images, ids = pairs
    method, attr, seconds = results[name]
    b, size, grid = images.shape[0], tiny_clip.image_size, tiny_clip.grid
    mods = _modalities(type(method))
    if "image" in mods:
        assert attr.image.shape == (b, *size) and attr.image_grid.shape == (b, *grid)
        assert torch.isfinite(attr.image_grid).all() and torch.isfinite(attr.image).all()
        assert attr.image.min() >= 0 and attr.image.max() <= 1
    else:
        assert attr.image is None and attr.image_grid is None
    if "text" in mods:
        assert attr.text.shape == ids.shape and attr.text_raw.shape == ids.shape
        assert torch.isfinite(attr.text_raw).all() and torch.isfinite(attr.text).all()
        assert attr.text.min() >= 0 and attr.text.max() <= 1
        outside = ~tiny_clip.text.span_mask(ids)
        assert (attr.text[outside] == 0).all() and (attr.text_raw[outside] == 0).all()
    else:
        assert attr.text is None and attr.text_raw is None
    for key, value in attr.scalars.items():
        assert value.shape == (b,) and torch.isfinite(value).all(), key


@pytest.mark.parametrize("name", NAMES)
def test_unsupported_modality_is_refused(tiny_clip, pairs, name):
    cls = clipib.METHODS[name]
    missing = [m for m in ("image", "text") if m not in cls.modalities]
    if not missing:
        pytest.skip(f"{name} attributes both modalities")
    images, ids = pairs
    with pytest.raises(ValueError, match="does not attribute"):
        cls(tiny_clip, **FAST.get(name, {})).attribute(images[:1], ids[:1], modality=missing[0])


def _raw(attr, mods):
    return [t for m, t in (("image", attr.image_grid), ("text", attr.text_raw)) if m in mods]


@pytest.mark.parametrize("name", NAMES)
def test_same_seed_same_result(pairs, results, name):
    images, ids = pairs
    method, attr, _ = results[name]
    again = method.attribute(images, ids, modality=_modality(type(method)), seeds=[3, 4, 5, 6])
    for a, b in zip(_raw(attr, method.modalities), _raw(again, method.modalities)):
        _close(a, b, 1e-5)


@pytest.mark.parametrize("model", ["tiny", FAMILY, COCA])
@pytest.mark.parametrize("name", NAMES)
def test_batch_equals_single_calls(tiny_clip, pairs, results, family_results, coca_results, name, model):
    _, pairs, results = _which(model, tiny_clip, pairs, results, family_results, coca_results)
    rel = BATCH_REL if model == "tiny" else FAMILY_REL
    images, ids = pairs
    method, attr, _ = results[name]
    for i in range(images.shape[0]):
        one = method.attribute(images[i : i + 1], ids[i : i + 1], modality=_modality(type(method)), seeds=[3 + i])
        for a, b in zip(_raw(attr, method.modalities), _raw(one, method.modalities)):
            _close(a[i], b[0], rel)
        for key, value in attr.scalars.items():
            _close(value[i], one.scalars[key][0], rel, SCALAR_FLOOR)


@pytest.mark.parametrize("name", [n for n in NAMES if "text" in clipib.METHODS[n].modalities])
def test_text_length_multiple_changes_nothing(tiny_clip, pairs, results, monkeypatch, name):
    """The causal text tower run on the longest caption rounded up to 16 positions (``text_length_multiple``,
    for ``compile=True``) gives the same maps and scalars: rows after a caption's EOT cannot reach it."""
    images, ids = pairs
    assert tiny_clip.text.valid_length(ids) % 16 != 0  # the rounding really adds rows
    method, attr, _ = results[name]
    monkeypatch.setattr(tiny_clip.text, "length_multiple", 16)
    assert tiny_clip.text.valid_length(ids) % 16 == 0
    padded = method.attribute(images, ids, modality=_modality(type(method)), seeds=[3, 4, 5, 6])
    for a, b in zip(_raw(attr, method.modalities), _raw(padded, method.modalities)):
        _close(a, b, BATCH_REL)
    for key, value in attr.scalars.items():
        _close(value, padded.scalars[key], BATCH_REL, SCALAR_FLOOR)


@pytest.mark.parametrize("name", NAMES)
def test_explain_cli(tmp_path, tiny_config, name):
    code = main(["explain", "--image", SAMPLE, "--text", "a red circle", "--method", name, "--model", tiny_config,
                 "--pretrained", "none", "--out", str(tmp_path)])
    assert code == 0
    saved = json.loads((tmp_path / "explanation.json").read_text())
    record = saved["pairs"][0]
    assert saved["method"] == name and (tmp_path / "explanation.png").is_file()
    mods = _modalities(clipib.METHODS[name])
    if "text" in mods:
        scores = record["token_scores"]
        assert len(scores) == len(record["tokens"]) == 5 and all(0 <= s <= 1 for s in scores)
    if "image" in mods:
        grid = record["grid_scores"]
        assert len(grid) > 0 and all(math.isfinite(v) for row in grid for v in row)
