"""Quantus 0.6.0 as an independent oracle for the array-only metrics of issue 14 (test-only; LGPL, never imported by
clipib): sparseness (Gini), complexity (entropy), relevance mass / rank accuracy, top-k intersection, the energy
pointing game (Quantus' AttributionLocalisation) and the mask AUROC (Quantus' AUC), on random maps and masks.

The model-based ones (MoRF / LeRF / ABPC with ROAD, faithfulness correlation) differ from Quantus by definition
(patches instead of pixels, ROAD's system solved by conjugate gradients, per-key random subsets; docs/metrics.md)
and are checked against their papers' formulas in tests/test_metrics_faithfulness.py.
"""
import numpy as np
import pytest
import torch

from clipib.metrics import (
    complexity,
    energy_pointing_game,
    mask_auroc,
    relevance_mass_accuracy,
    relevance_rank_accuracy,
    sparseness,
    topk_intersection,
)

quantus = pytest.importorskip("quantus")

B, H, W = 6, 8, 8


@pytest.fixture(scope="module")
def batch():
    rng = np.random.default_rng(0)
    maps = rng.random((B, 1, H, W))
    maps[0] = np.round(maps[0], 1)  # ties
    masks = np.zeros((B, 1, H, W))
    for i in range(B):  # a different box per sample
        y0, x0 = rng.integers(0, 4, size=2)
        masks[i, :, y0 : y0 + 3 + i % 3, x0 : x0 + 2 + i % 4] = 1
    kwargs = dict(model=None, x_batch=rng.random((B, 3, H, W)).astype(np.float32), y_batch=np.zeros(B, dtype=int),
                  a_batch=maps, s_batch=masks, device="cpu")
    return kwargs, torch.tensor(maps[:, 0]), torch.tensor(masks[:, 0]).bool()


def _quantus(metric, kwargs) -> np.ndarray:
    return np.asarray(metric(**kwargs), dtype=np.float64)


@pytest.mark.parametrize("name", ["sparseness", "complexity", "relevance_mass", "relevance_rank", "topk", "energy",
                                  "auroc"])
def test_agrees_with_quantus(batch, name):
    kwargs, maps, masks = batch
    ours, theirs, tol = {
        "sparseness": (lambda: sparseness(maps), lambda: quantus.Sparseness(disable_warnings=True), 1e-6),
        "complexity": (lambda: complexity(maps), lambda: quantus.Complexity(disable_warnings=True), 1e-6),
        "relevance_mass": (lambda: relevance_mass_accuracy(maps, masks),
                           lambda: quantus.RelevanceMassAccuracy(disable_warnings=True), 1e-9),
        "relevance_rank": (lambda: relevance_rank_accuracy(maps, masks),
                           lambda: quantus.RelevanceRankAccuracy(disable_warnings=True), 1e-9),
        "topk": (lambda: topk_intersection(maps, masks, k=13 / (H * W)),
                 lambda: quantus.TopKIntersection(k=13, disable_warnings=True), 1e-9),
        "energy": (lambda: energy_pointing_game(maps, masks),
                   lambda: quantus.AttributionLocalisation(disable_warnings=True), 1e-9),
        "auroc": (lambda: mask_auroc(maps, masks), lambda: quantus.AUC(disable_warnings=True), 1e-9),
    }[name]
    got = ours().numpy()
    want = _quantus(theirs(), kwargs)
    if name in ("relevance_rank", "topk"):  # documented difference: clipib counts tied entries fractionally,
        got, want = got[1:], want[1:]       # Quantus by argsort order — compare the maps without ties
    # sparseness: Quantus sorts float32 copies; everything else is float64 on both sides
    np.testing.assert_allclose(got, want, rtol=tol, atol=tol)


def test_ties_count_fractionally_not_by_position():
    """The pinned difference: with ties across the cut, clipib's value does not depend on where tied pixels lie."""
    maps = torch.tensor([[[3.0, 1.0, 1.0, 0.0]]])  # the 2nd and 3rd pixels tie across the top-2 cut
    first = torch.tensor([[[True, True, False, False]]])  # the object holds the top pixel and one of the tied
    second = torch.tensor([[[True, False, True, False]]])  # ... the other one
    for fn in (relevance_rank_accuracy, lambda m, g: topk_intersection(m, g, k=0.5)):
        assert fn(maps, first).item() == fn(maps, second).item() == pytest.approx(0.75)  # 1 + half a hit, of 2
