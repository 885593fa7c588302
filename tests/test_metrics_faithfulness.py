"""Issue 14 metrics (perturbation curves, faithfulness correlation, complexity, relevance localisation, oracle).

Quantus is not used as the oracle: Quantus 0.6.0 pulls opencv-python, scipy, pandas, scikit-image and
scikit-learn (estimated well over 300 MB installed; docs/metrics.md), so each kernel is checked against a
plain-Python transcription of its paper's definition (Quantus' formula where it has one) on random maps and
masks, to 1e-9 unless stated. Documented differences from Quantus are pinned: fractional ties (rank accuracy),
NaN for constant maps, signed relevance mass vs the energy game's positive part.
"""
import math
import statistics

import pytest
import torch

import clipib
import clipib.cli
import clipib.metrics as M
from clipib.metrics.base import key_generators
from clipib.data.sources import ModelTransforms, ShapesDataset


def _maps(seed=0, b=4, h=6, w=7):
    g = torch.Generator().manual_seed(seed)
    maps = torch.rand(b, h, w, generator=g, dtype=torch.float64)  # continuous: no ties
    mask = torch.rand(b, h, w, generator=g) < 0.3
    mask[:, 0, 0], mask[:, -1, -1] = True, False  # non-empty, not full
    return maps, mask


def _py_rows(maps, mask):
    return [(maps[i].flatten().tolist(), mask[i].flatten().tolist()) for i in range(maps.shape[0])]


def test_complexity_kernels_match_the_papers_definitions():
    maps, _ = _maps()
    for i, (a, _) in enumerate(_py_rows(maps, maps > 0)):
        c, n = sorted(abs(v) for v in a), len(a)  # Chalasani (Hurley-Rickard): 1 - 2 sum c_k/|c|_1 (n-k+1/2)/n
        gini = 1 - 2 * sum(ck / sum(c) * (n - k + 0.5) / n for k, ck in enumerate(c, start=1))
        p = [abs(v) / sum(abs(x) for x in a) for v in a]  # Bhatt: entropy of the fractional contribution
        assert M.sparseness(maps)[i].item() == pytest.approx(gini, abs=1e-9)
        assert M.complexity(maps)[i].item() == pytest.approx(-sum(q * math.log(q) for q in p), abs=1e-9)
    zero = torch.zeros(2, 3, 3)
    assert M.sparseness(zero).isnan().all() and M.complexity(zero).isnan().all()
    text = torch.tensor([[0.0, 1.0, 1.0, 5.0]])
    valid = torch.tensor([[False, True, True, False]])  # only the two equal tokens count: uniform
    assert M.sparseness(text, valid).item() == 0 and M.complexity(text, valid).item() == pytest.approx(math.log(2))


def test_localisation_kernels_match_the_definitions():
    maps, mask = _maps(1)
    for i, (a, s) in enumerate(_py_rows(maps, mask)):
        inside = sum(v for v, m in zip(a, s) if m)
        k = sum(s)
        order = sorted(range(len(a)), key=lambda j: -a[j])  # Quantus: argsort, no ties here
        top20 = max(1, round(0.2 * len(a)))
        pos = [v for v, m in zip(a, s) if m]
        neg = [v for v, m in zip(a, s) if not m]
        auc = sum((p > q) + 0.5 * (p == q) for p in pos for q in neg) / (len(pos) * len(neg))
        assert M.energy_pointing_game(maps, mask)[i].item() == pytest.approx(inside / sum(a), abs=1e-9)
        assert M.relevance_mass_accuracy(maps, mask)[i].item() == pytest.approx(inside / sum(a), abs=1e-9)
        assert M.relevance_rank_accuracy(maps, mask)[i].item() == pytest.approx(
            sum(s[j] for j in order[:k]) / k, abs=1e-9)
        assert M.topk_intersection(maps, mask, k=0.2)[i].item() == pytest.approx(
            sum(s[j] for j in order[:top20]) / top20, abs=1e-9)
        assert M.mask_auroc(maps, mask)[i].item() == pytest.approx(auc, abs=1e-9)
    signed = maps - 0.5  # relevance mass is signed (Arras), the energy game keeps the positive part
    assert not torch.allclose(M.relevance_mass_accuracy(signed, mask), M.energy_pointing_game(signed, mask))


def test_localisation_ties_constant_maps_and_empty_objects():
    mask = torch.tensor([[[True, False], [False, False]]])
    tied = torch.tensor([[[1.0, 1.0], [0.0, 0.0]]])  # the top pixel is tied with one outside: half a hit
    assert M.relevance_rank_accuracy(tied, mask).item() == 0.5
    assert M.mask_auroc(tied, mask).item() == pytest.approx((1 + 1 + 0.5) / 3)
    for kernel in (M.energy_pointing_game, M.relevance_mass_accuracy, M.relevance_rank_accuracy,
                   M.topk_intersection, M.mask_auroc):
        assert kernel(torch.full((1, 2, 2), 0.3), mask).isnan().all(), kernel  # constant: NaN, not chance
        assert kernel(tied, torch.zeros_like(mask)).isnan().all(), kernel  # empty object
    assert M.mask_auroc(tied, torch.ones_like(mask)).isnan().all()  # no negatives


def test_faithfulness_correlation_is_pearson_and_subsets_are_batch_independent():
    g = torch.Generator().manual_seed(3)
    x, y = torch.randn(3, 20, generator=g), torch.randn(3, 20, generator=g)
    for i in range(3):
        ref = statistics.correlation(x[i].tolist(), y[i].tolist())
        assert M.pearson_rows(x, y)[i].item() == pytest.approx(ref, abs=1e-9)
    valid = torch.ones(3, 10, dtype=torch.bool)
    valid[1, 5:] = False
    both = M.random_subsets(key_generators({"key": ["a", "b", "c"]}), valid, 6, 0.3)
    alone = M.random_subsets(key_generators({"key": ["b"]}), valid[1:2], 6, 0.3)
    assert torch.equal(both[1], alone[0]) and (both.sum(-1)[0] == 3).all() and (both.sum(-1)[1] == 2).all()
    assert not both[1][:, 5:].any()


def test_road_imputation_solves_the_linear_system():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 16, 16, generator=g, dtype=torch.float64)
    hole = torch.rand(2, 1, 16, 16, generator=g) < 0.4
    y = M.road_impute(x, hole, 0.0, iters=400)
    assert torch.equal(y[~hole.expand_as(y)], x[~hole.expand_as(x)])
    w = {(-1, -1): 1 / 12, (-1, 0): 1 / 6, (-1, 1): 1 / 12, (0, -1): 1 / 6, (0, 1): 1 / 6, (1, -1): 1 / 12,
         (1, 0): 1 / 6, (1, 1): 1 / 12}
    for b, c, i, j in [(0, 0, *divmod(int(k), 16)) for k in hole[0, 0].flatten().nonzero()[:10, 0]]:
        nb = [(wt, y[b, c, i + di, j + dj].item()) for (di, dj), wt in w.items() if 0 <= i + di < 16 and 0 <= j + dj < 16]
        assert y[b, c, i, j].item() == pytest.approx(sum(wt * v for wt, v in nb) / sum(wt for wt, _ in nb), abs=1e-6)
    noisy = M.road_impute(x, hole, 0.5, iters=400)
    assert torch.equal(noisy[~hole.expand_as(y)], x[~hole.expand_as(x)]) and (noisy - y).abs().max() > 0.1


def test_morf_lerf_curves_on_a_toy_scorer():
    """Score = mean pixel value, fill black (0 here): removing the brightest patch first is MoRF."""
    images = torch.zeros(1, 1, 4, 4)
    images[0, 0, :2, :2] = 4.0  # patch 0
    images[0, 0, 2:, 2:] = 1.0  # patch 3
    patches = (torch.arange(4)[:, None] // 2) * 2 + torch.arange(4)[None] // 2  # [H, W] 2x2 grid
    score = lambda x, rows: x.flatten(1).mean(1)  # noqa: E731
    grid = torch.tensor([[[2.0, 0.5], [0.0, 1.0]]])
    frac, curves = M.image_perturbation_curves(images, grid, patches, score, fill=0.0, chunk=3)
    assert frac.tolist() == [0.0, 0.25, 0.5, 0.75, 1.0]
    assert curves["morf"][0].tolist() == [1.25, 0.25, 0.0, 0.0, 0.0]
    assert curves["lerf"][0].tolist() == [1.25, 1.25, 1.25, 1.0, 0.0]


def test_oracle_needs_the_batch(tiny_clip, pairs):
    images, ids = pairs
    assert clipib.METHODS["oracle"].NEEDS_BATCH and not clipib.METHODS["random"].NEEDS_BATCH
    with pytest.raises(SystemExit):  # not offered by `clipib explain`
        clipib.cli.main(["explain", "--image", "x.png", "--text", "a", "--method", "oracle"])
    from clipib.bench.throughput import run_benchmark

    with pytest.raises(ValueError, match="eval batch"):  # nor by `clipib bench`
        run_benchmark(tiny_clip, ["oracle"], [1], reference_pairs=0, warmup=False, flops=False)
    with pytest.raises(ValueError, match="attribute_batch"):
        clipib.METHODS["oracle"](tiny_clip).attribute(images, ids)
    with pytest.raises(ValueError, match="gold_tokens"):
        clipib.METHODS["oracle"](tiny_clip).attribute_batch({"image": images, "ids": ids, "box": torch.ones(4, 4)})


@pytest.fixture(scope="module")
def shapes_scores():
    clip = clipib.load_clip("clipib-shapes")
    ds = ShapesDataset(12, seed=2, split="test")
    ds.use_transforms(ModelTransforms.from_clip(clip))
    batch = next(iter(torch.utils.data.DataLoader(ds, batch_size=12)))
    out = {}
    for name in ("oracle", "grad_cam", "random"):
        attr = clipib.METHODS[name](clip).attribute_batch(batch, "image", seeds=list(range(12)))
        values = {}
        for metric in (M.RelevanceLocalization(), M.PerturbationCurves(steps=4, road_iters=10, chunk=64), M.Localization(),
                       M.PointingGame()):
            values.update({k: float(v.nanmean()) for k, v in metric.update(clip, batch, attr, "image").items()})
        out[name] = values
    return out


@pytest.mark.parametrize("value", ["energy_pg", "rel_mass", "rel_rank", "topk_inter", "mask_auroc", "iou", "pg_iou",
                                   "pointing_game", "image_abpc", "image_morf"])
def test_oracle_best_random_worst_on_shapes(shapes_scores, value):
    s = {k: v[value] for k, v in shapes_scores.items()}
    if value == "image_morf":  # lower is better
        s = {k: -v for k, v in s.items()}
    assert s["oracle"] > s["grad_cam"] > s["random"], (value, shapes_scores)


class _OnDevice(torch.Tensor):
    """A tensor that refuses to leave its device: ``.cpu()``, ``.numpy()``, ``.tolist()`` raise."""

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        if func in (torch.Tensor.cpu, torch.Tensor.numpy, torch.Tensor.tolist):
            raise AssertionError(f"a metric called {func.__name__} on a batch tensor")
        return super().__torch_function__(func, types, args, kwargs or {})


def test_new_metrics_keep_the_batch_on_its_device(tiny_clip, pairs):
    images, ids = pairs
    b, (h, w) = images.shape[0], tiny_clip.image_size
    g = torch.Generator().manual_seed(0)
    stay = lambda t: t.as_subclass(_OnDevice)  # noqa: E731
    with pytest.raises(AssertionError, match="numpy"):
        stay(images).numpy()
    boxes = torch.tensor([[0.0, 0.0, w / 2, h / 2]]).expand(b, 4)
    batch = {"image": stay(images), "ids": stay(ids), "box": stay(boxes), "key": [str(i) for i in range(b)]}
    text_raw = torch.rand(ids.shape, generator=g) * tiny_clip.text.span_mask(ids)
    attr = clipib.Attribution(image=stay(torch.rand(b, h, w, generator=g)),
                              image_grid=stay(torch.rand(b, *tiny_clip.grid, generator=g)),
                              text=stay(text_raw), text_raw=stay(text_raw))
    metrics = [M.PerturbationCurves(steps=2, road_iters=2), M.FaithfulnessCorrelation(n_subsets=3, fill="road"),
               M.ComplexityMetrics(), M.RelevanceLocalization()]
    for metric in metrics:
        for mod in ("image", "text"):
            for v in metric.update(tiny_clip, batch, attr, mod).values():
                assert v.shape == (b,)


def test_chunk_and_batch_do_not_change_the_values(tiny_clip, pairs):
    """ROAD's noise and the random subsets are drawn per pair key and copy: chunking and batching are invisible
    (up to float32 summation order in the model for different batch shapes, ~2e-6 here; another
    seed moves the MoRF AUC by ~1e-3 and the correlation by ~1)."""
    images, ids = pairs
    g = torch.Generator().manual_seed(1)
    attr = clipib.Attribution(image_grid=torch.rand(4, *tiny_clip.grid, generator=g),
                              text_raw=torch.rand(ids.shape, generator=g) * tiny_clip.text.span_mask(ids))
    batch = {"image": images, "ids": ids, "key": ["a", "b", "c", "d"]}
    one = {"image": images[2:3], "ids": ids[2:3], "key": ["c"]}
    single = clipib.Attribution(image_grid=attr.image_grid[2:3], text_raw=attr.text_raw[2:3])
    for make in (lambda c: M.PerturbationCurves(steps=3, road_iters=4, chunk=c),
                 lambda c: M.FaithfulnessCorrelation(n_subsets=5, fill="road", road_iters=4, chunk=c)):
        for mod in ("image", "text"):
            big = make(64).update(tiny_clip, batch, attr, mod)
            small = make(3).update(tiny_clip, batch, attr, mod)
            alone = make(1).update(tiny_clip, one, single, mod)
            for k in big:
                torch.testing.assert_close(big[k], small[k], rtol=1e-4, atol=1e-5, equal_nan=True)
                torch.testing.assert_close(big[k][2:3], alone[k], rtol=1e-4, atol=1e-5, equal_nan=True)
