"""Numerical safety (issue 19, item 3; docs/metrics.md "Degenerate inputs", docs/guarantees.md).

Every metric on a constant / all-zero map and on a map with a NaN gives NaN (counted in ``skipped``) unless it
declares the blank map's value meaningful (``CONSTANT_MAP``); non-finite images are refused by every method; a
pair whose clean embedding is zero gets NaN maps and a NaN cosine; property tests (hypothesis) on the metric
kernels and the map normalisation, in float32, float16 and bfloat16.
"""

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from scipy.stats import rankdata

import clipib
from clipib.attribution import METHODS, Attribution
from clipib.attribution.base import minmax
from clipib.metrics import (
    METRICS,
    SeedMeanStd,
    average_ranks,
    complexity,
    effective_heat_ratio,
    energy_pointing_game,
    localization_iou,
    mask_auroc,
    nanquantile_linear,
    pair_cosine,
    pearson_rows,
    pointing_game,
    pointing_game_iou,
    relevance_mass_accuracy,
    relevance_rank_accuracy,
    sparseness,
    spearman,
    topk_intersection,
)

FAST = settings(max_examples=25, deadline=None)
ALL = {"confidence": {}, "localization": {"q": 0.6}, "pointing_game": {"tolerance": 1}, "ehr": {},
       "insertion_deletion": {"steps": 2}, "text_topk": {"k": 2}, "mismatch_scalars": {}, "similarity": {},
       "perturbation": {"steps": 2, "road_iters": 3}, "faithfulness_correlation": {"n_subsets": 4},
       "complexity": {}, "relevance_localization": {},
       "model_randomisation": {"fractions": (1.0,)}, "other_target": {}, "sensitivity": {"samples": 2},
       "seed_stability": {}}
SEEDS = [3, 4, 5, 6]


@pytest.fixture(scope="module")
def batch(labelled_batch):
    """The tiny pairs with an object box, a gold token and matched flags (tests/conftest.py)."""
    return labelled_batch


def _degenerate(attr: Attribution, span: torch.Tensor) -> Attribution:
    """Pair 0: all-zero maps; pair 1: a NaN in each map; pairs 2-3 untouched."""
    image, text = attr.image.clone(), attr.text.clone()
    image[0], text[0] = 0.0, 0.0
    image[1, 3, 3] = math.nan
    text[1, span[1].nonzero()[0]] = math.nan
    grid, raw = attr.image_grid.clone(), attr.text_raw.clone()
    grid[0], raw[0] = 0.0, 0.0
    return Attribution(image=image, image_grid=grid, text=text, text_raw=raw, scalars=attr.scalars)


def _per_pair(name: str) -> bool:
    metric = METRICS[name]()  # some metrics name their values in __init__
    return bool(metric.value_names("image") + metric.value_names("text"))


PER_PAIR = sorted(name for name in METRICS if _per_pair(name))
"""Every registered metric with per-pair values (a dataset-level metric declares none and writes no records)."""


def test_every_per_pair_metric_is_covered():
    assert set(PER_PAIR) <= set(ALL), "add the new metric's test settings to ALL"


@pytest.mark.parametrize("name", PER_PAIR)
def test_every_metric_on_blank_and_nan_maps(name, tiny_clip, batch):
    """Blank map: NaN (or the metric's declared value); NaN map: NaN; other pairs: unchanged; counted."""
    method = METHODS["saliency"](tiny_clip)
    attr = method.attribute(batch["image"], batch["ids"], "both", seeds=SEEDS)
    bad = _degenerate(attr, tiny_clip.text.span_mask(batch["ids"]))
    metric, clean = METRICS[name](**ALL[name]), METRICS[name](**ALL[name])
    rerun = {"method": method, "seeds": SEEDS} if metric.needs_method else {}
    for mod in ("image", "text"):
        got = metric.update(tiny_clip, batch, bad, mod, **rerun)
        want = clean.update(tiny_clip, batch, attr, mod, **rerun)
        for value, v in got.items():
            v, w = v.double(), want[value].double()
            assert torch.allclose(v[2:], w[2:], equal_nan=True), (name, value)
            if metric.CONSTANT_MAP == "unused":
                assert torch.allclose(v, w, equal_nan=True), (name, value)
                continue
            assert math.isnan(v[1]), (name, value, "NaN map")
            if metric.CONSTANT_MAP == "nan":
                assert math.isnan(v[0]), (name, value, "blank map")
            else:
                assert math.isfinite(v[0]), (name, value, "a blank map has a value here")
    for value, stats in metric.compute().items():
        assert stats["n"] + stats["skipped"] == 4
        if metric.CONSTANT_MAP != "unused":
            assert stats["skipped"] >= 1 + (metric.CONSTANT_MAP == "nan"), (name, value)


@pytest.mark.parametrize("name", sorted(METHODS))
def test_every_method_refuses_non_finite_images(name, tiny_clip, batch):
    for bad in (math.nan, math.inf):
        x = batch["image"].clone()
        x[2, 1, 5, 5] = bad
        with pytest.raises(ValueError, match=r"NaN or inf \(pairs \[2\]\)"):
            METHODS[name](tiny_clip).attribute_batch(dict(batch, image=x), METHODS[name].modality_for("both"))


@pytest.mark.parametrize("name", ["saliency", "nib", "grad_cam", "random"])
def test_zero_norm_embedding_gives_nan_maps_and_cosine(name, tiny_clip, pairs, monkeypatch):
    """The tower maps pair 0's image to the zero vector: its maps and cosine are NaN, the others unchanged."""
    images, ids = pairs
    method = METHODS[name](tiny_clip)
    mod = method.modality_for("both")
    clean = method.attribute(images, ids, mod, seeds=SEEDS)
    tower, encode = tiny_clip.image, tiny_clip.image.encode

    def zero_first(x):
        out = encode(x)
        hit = (x.flatten(1) == images[0].flatten()).all(1)  # [N]
        return out.masked_fill(hit[:, None], 0.0)

    monkeypatch.setattr(tower, "encode", zero_first)
    attr = method.attribute(images, ids, mod, seeds=SEEDS)
    for field in ("image", "image_grid", "text", "text_raw"):
        got, want = getattr(attr, field), getattr(clean, field)
        if want is None:
            continue
        assert torch.isnan(got[0]).all(), field
        assert torch.equal(got[1:], want[1:]), field
    cos = pair_cosine(tiny_clip, images, ids)
    assert math.isnan(cos[0]) and torch.isfinite(cos[1:]).all()


def test_bf16_precision_path_gives_finite_maps(tiny_clip, pairs):
    images, ids = pairs
    attr = METHODS["nib"](tiny_clip, precision="bf16").attribute(images, ids, "both", seeds=SEEDS)
    for t in (attr.image, attr.text):
        assert torch.isfinite(t).all() and t.min() >= 0 and t.max() <= 1


# --- property tests ----------------------------------------------------------------------------------------------

def _grid(lo: float, hi: float):
    """Floats in [lo, hi] on a 1e-3 grid: a map whose values differ by ~1e-30 is numerically constant (an affine
    shift or a variance erases the difference), which the exact-equality "constant" of these tests would not say."""
    return st.integers(round(lo * 1000), round(hi * 1000)).map(lambda k: k / 1000.0)


def _maps(rows=(1, 3), side=(3, 6), lo=-5.0, hi=5.0):
    """float32 maps ``[B, S, S]``, often with ties (values on a coarse grid)."""
    return st.tuples(st.integers(*rows), st.integers(*side)).flatmap(
        lambda s: hnp.arrays(np.float32, (s[0], s[1], s[1]),
                             elements=st.one_of(_grid(lo, hi), st.sampled_from([0.0, 1.0]))))


def _with_mask(data, maps):
    mask = data.draw(hnp.arrays(np.bool_, maps.shape))
    return torch.from_numpy(maps), torch.from_numpy(mask)


DTYPES = [torch.float32, torch.float16, torch.bfloat16]


@FAST
@given(x=_maps(), dtype=st.sampled_from(DTYPES))
def test_minmax_properties(x, dtype):
    t = torch.from_numpy(x).to(dtype)
    out = minmax(t)
    assert out.dtype == dtype and out.shape == t.shape
    flat, o = t.flatten(1).float(), out.flatten(1).float()
    assert ((o >= 0) & (o <= 1)).all()
    constant = flat.amax(1) == flat.amin(1)
    assert (o[constant] == 0).all()
    assert (o[~constant].amax(1) == 1).all() and (o[~constant].amin(1) == 0).all()
    assert (o.argmax(1) == flat.argmax(1))[~constant].all()  # the order is kept
    # a NaN or inf anywhere: the whole row is NaN (undefined), the other rows unchanged
    broken = t.clone()
    broken.view(t.shape[0], -1)[0, 0] = math.inf
    again = minmax(broken)
    assert torch.isnan(again[0]).all() and torch.equal(again[1:], out[1:])


@FAST
@given(x=_maps(lo=-3, hi=3), a=st.floats(0.25, 8.0), b=st.floats(-4.0, 4.0))
def test_minmax_affine_invariance(x, a, b):
    t = torch.from_numpy(x).double()
    assert torch.allclose(minmax(a * t + b), minmax(t), atol=1e-9)


@FAST
@given(data=st.data(), x=_maps(lo=0.0, hi=1.0))
def test_localization_kernels_bounded_nan_iff_empty_target(data, x):
    maps, mask = _with_mask(data, x)
    empty = ~mask.flatten(1).any(1)
    for fn in (localization_iou, pointing_game_iou, pointing_game):
        v = fn(maps, mask)
        assert (torch.isnan(v) == empty).all(), fn.__name__
        assert ((v[~empty] >= 0) & (v[~empty] <= 1)).all(), fn.__name__
    ehr = effective_heat_ratio(maps, mask)
    ok = ~torch.isnan(ehr)
    assert ((ehr[ok] >= 0) & (ehr[ok] <= 1)).all()
    for fn in (energy_pointing_game, relevance_mass_accuracy, relevance_rank_accuracy, topk_intersection, mask_auroc):
        v = fn(maps, mask)
        constant = maps.flatten(1).amax(1) == maps.flatten(1).amin(1)
        assert torch.isnan(v[empty | constant]).all(), fn.__name__  # never a silent 0 or hit
        fin = v[~torch.isnan(v)]
        assert ((fin >= 0) & (fin <= 1 + 1e-12)).all(), fn.__name__


@FAST
@given(data=st.data(), x=_maps(lo=0.0, hi=1.0))
def test_kernels_refuse_non_finite_maps(data, x):
    maps, mask = _with_mask(data, x)
    maps[0, 0, 0] = data.draw(st.sampled_from([math.nan, math.inf, -math.inf]))
    for fn in (localization_iou, pointing_game_iou, pointing_game, effective_heat_ratio, sparseness, complexity):
        with pytest.raises(ValueError, match="NaN or inf"):
            fn(maps, mask) if fn not in (sparseness, complexity) else fn(maps)


@FAST
@given(x=_maps(lo=-2.0, hi=2.0), scale=st.floats(0.1, 10.0))
def test_sparseness_complexity_bounds_and_scale(x, scale):
    maps = torch.from_numpy(x)
    zero = maps.abs().flatten(1).amax(1) == 0
    s, c = sparseness(maps), complexity(maps, normalized=True)
    assert (torch.isnan(s) == zero).all() and (torch.isnan(c) == zero).all()
    assert ((s[~zero] >= -1e-9) & (s[~zero] <= 1)).all() and ((c[~zero] >= -1e-9) & (c[~zero] <= 1 + 1e-9)).all()
    assert torch.allclose(sparseness(maps * scale), s, atol=1e-5, equal_nan=True)


@FAST
@given(data=st.data(), n=st.integers(2, 12), b=st.integers(1, 3))
def test_rank_correlations(data, n, b):
    # values on a 1e-3 grid: a row whose spread is ~1e-24 has a variance that underflows float32, numerically
    # constant (NaN is right for it, but "constant" below is exact equality)
    vals = st.sampled_from([0.0, 1.0, 2.0, 3.5]) | st.integers(-3000, 3000).map(lambda k: k / 1000.0)
    x = torch.from_numpy(data.draw(hnp.arrays(np.float32, (b, n), elements=vals)))
    y = torch.from_numpy(data.draw(hnp.arrays(np.float32, (b, n), elements=vals)))
    constant = (x.amax(1) == x.amin(1)) | (y.amax(1) == y.amin(1))
    for fn in (spearman, pearson_rows):
        r = fn(x, y)
        assert (torch.isnan(r) == constant).all(), fn.__name__
        assert (r[~constant].abs() <= 1 + 1e-9).all()
        assert torch.allclose(r, fn(y, x), equal_nan=True)
        self_r = fn(x, x)
        xc = x.amax(1) == x.amin(1)
        assert torch.allclose(self_r[~xc], torch.ones_like(self_r[~xc]))


@FAST
@given(x=hnp.arrays(np.float64, st.tuples(st.integers(1, 3), st.integers(1, 9)),
                    elements=st.one_of(st.floats(-10, 10), st.just(np.nan), st.sampled_from([1.0, 2.0]))),
       q=st.floats(0.0, 1.0))
def test_nanquantile_and_ranks_match_numpy_scipy(x, q):
    t = torch.from_numpy(x)
    got = nanquantile_linear(t, q).numpy()
    with np.errstate(all="ignore"), pytest.warns(RuntimeWarning) if np.isnan(x).all(1).any() else _nothing():
        want = np.nanquantile(x, q, axis=1)
    np.testing.assert_allclose(got, want, rtol=1e-9, atol=1e-9, equal_nan=True)
    finite = np.nan_to_num(x, nan=0.0)
    np.testing.assert_allclose(average_ranks(torch.from_numpy(finite)).numpy(), rankdata(finite, axis=1))


class _nothing:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


@FAST
@given(values=hnp.arrays(np.float64, st.integers(1, 20),
                         elements=st.one_of(st.floats(-1e3, 1e3), st.just(np.nan), st.just(np.inf))),
       cut=st.integers(0, 20))
def test_seed_mean_std_counts_non_finite_and_is_split_invariant(values, cut):
    one, two = SeedMeanStd(["v"]), SeedMeanStd(["v"])
    one.update({"v": torch.from_numpy(values)})
    two.update({"v": torch.from_numpy(values[:cut])})
    two.update({"v": torch.from_numpy(values[cut:])})
    a, b = one.compute()["v"], two.compute()["v"]
    finite = np.isfinite(values)
    assert a["n"] == finite.sum() and a["skipped"] == (~finite).sum()
    assert torch.allclose(a["mean"], b["mean"], equal_nan=True)
    if finite.any():
        assert float(a["mean"]) == pytest.approx(values[finite].mean(), rel=1e-9, abs=1e-9)
    else:
        assert math.isnan(a["mean"])


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_kernels_accept_half_precision_maps(dtype):
    """Maps on a k/8 grid are exact in every dtype: the kernels give the float32 values."""
    gen = torch.Generator().manual_seed(0)
    maps = torch.randint(0, 9, (3, 6, 6), generator=gen).float() / 8
    mask = torch.zeros(3, 6, 6, dtype=torch.bool)
    mask[:, 1:4, 2:5] = True
    for fn in (localization_iou, pointing_game_iou, pointing_game, effective_heat_ratio, energy_pointing_game,
               relevance_mass_accuracy, mask_auroc):
        assert torch.allclose(fn(maps.to(dtype), mask).double(), fn(maps, mask).double(), equal_nan=True), fn.__name__
    for fn in (sparseness, complexity):
        assert torch.allclose(fn(maps.to(dtype)).double(), fn(maps).double(), equal_nan=True), fn.__name__


def test_all_nan_image_is_refused_before_any_pass(tiny_clip):
    """An all-NaN image is refused with the same clear error (M2IB: nothing is optimised)."""
    images = torch.full((1, 3, *tiny_clip.image_size), math.nan)
    with pytest.raises(ValueError, match="NaN or inf"):
        clipib.METHODS["m2ib"](tiny_clip, steps=1, copies=1).attribute(images, tiny_clip.tokenize(["a dog"]))
