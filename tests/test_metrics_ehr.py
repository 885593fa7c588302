"""Effective Heat Ratio (InputIBA App. F), worked out by hand."""
import math

import pytest
import torch

from clipib.attribution import Attribution
from clipib.metrics import EffectiveHeatRatio, effective_heat_ratio, ehr_curve

BOX = torch.tensor([[0.0, 0.0, 2.0, 2.0]])  # 4 of 16 px = 25 %, as in App. F Fig. 11


def _fig11(inside, outside):
    m = torch.full((1, 4, 4), outside)
    m[0, :2, :2] = inside
    return m


def test_inputiba_fig11_examples():
    # (a) heat 1 inside, 0 outside: every threshold (capped at 0.99) selects the box -> ratio 1 -> EHR 1.
    assert effective_heat_ratio(_fig11(1.0, 0.0), BOX).item() == pytest.approx(1.0)
    # (b) 1 inside, 0.25 outside. Remaining heat: 12 x 0.25, 4 x 1.0; quantile positions q * 15:
    #     q <= 0.7 -> 0.25, q >= 0.8 -> 1.0 capped to 0.99. At t = 0.25 all 16 px are selected, heat in
    #     the box 4 * 1.0 -> ratio 4 / 16 = 0.25; at t = 0.99 the box alone -> 1.
    #     AUC = 0.25 * 0.7 + (0.25 + 1) / 2 * 0.1 + 1 * 0.2 = 0.4375 (the figure prints "0.4").
    assert effective_heat_ratio(_fig11(1.0, 0.25), BOX).item() == pytest.approx(0.4375)
    # (c) 0.25 inside, 0 outside: the box alone is selected, ratio = 0.25 * 4 / 4 -> EHR 0.25 ("0.2").
    assert effective_heat_ratio(_fig11(0.25, 0.0), BOX).item() == pytest.approx(0.25)
    # unweighted counts pixels: (c) becomes 1, (b) stays 0.4375
    assert effective_heat_ratio(_fig11(0.25, 0.0), BOX, weighted=False).item() == pytest.approx(1.0)
    assert effective_heat_ratio(_fig11(1.0, 0.25), BOX, weighted=False).item() == pytest.approx(0.4375)


def test_graded_heat_by_hand():
    # 1 x 10 map, ROI = pixels 3..5 (30 % <= 33 %). 0.05 is below the base threshold and ignored.
    heat = torch.tensor([[[0.05, 0.2, 0.4, 0.6, 0.8, 1.0, 0.0, 0.0, 0.0, 0.0]]], dtype=torch.float64)
    roi = torch.zeros(1, 1, 10, dtype=torch.bool)
    roi[0, 0, 3:6] = True
    # remaining heat [0.2, 0.4, 0.6, 0.8, 1.0]; quantile at level q = value at position 4q (linear):
    # thresholds 0.2, .28, .36, .44, .52, .6, .68, .76, .84, .92, min(1.0, .99)
    # selected:    5px,  4,   4,   3,   3,   3,  2,   2,   1,   1,   1
    # weighted (ROI heat 0.6+0.8+1.0 = 2.4 / selected px):
    w = [2.4 / 5, 2.4 / 4, 2.4 / 4, 0.8, 0.8, 0.8, 0.9, 0.9, 1.0, 1.0, 1.0]
    u = [3 / 5, 3 / 4, 3 / 4] + [1.0] * 8
    levels, ratios = ehr_curve(heat, roi)
    assert torch.allclose(ratios[0], torch.tensor(w, dtype=torch.float64))
    trap = lambda r: 0.1 * (sum(r) - (r[0] + r[-1]) / 2)  # noqa: E731
    assert effective_heat_ratio(heat, roi).item() == pytest.approx(trap(w))  # 0.814
    assert effective_heat_ratio(heat, roi, weighted=False).item() == pytest.approx(trap(u))  # 0.93
    assert trap(w) == pytest.approx(0.814) and trap(u) == pytest.approx(0.93)


def test_map_equal_to_mask_and_constant_maps():
    gt = torch.zeros(1, 6, 6, dtype=torch.bool)
    gt[0, 1:3, 1:4] = True  # 6 / 36
    assert effective_heat_ratio(gt.float(), gt).item() == pytest.approx(1.0)
    frac = 6 / 36
    assert effective_heat_ratio(torch.full((1, 6, 6), 0.5), gt).item() == pytest.approx(0.5 * frac)
    assert effective_heat_ratio(torch.full((1, 6, 6), 0.5), gt, weighted=False).item() == pytest.approx(frac)
    assert effective_heat_ratio(torch.full((1, 6, 6), 0.05), gt).item() == 0.0  # no heat >= 0.1
    assert effective_heat_ratio(torch.zeros(1, 6, 6), gt).item() == 0.0


def test_large_roi_skipped_and_counted():
    maps = torch.rand(3, 4, 4, generator=torch.Generator().manual_seed(0))
    boxes = torch.tensor([[0.0, 0.0, 2.0, 2.0], [0.0, 0.0, 4.0, 2.0], [0.0, 0.0, 1.0, 1.0]])  # 25 %, 50 %, 6 %
    v = effective_heat_ratio(maps, boxes)
    assert math.isnan(v[1].item()) and not math.isnan(v[0].item()) and not math.isnan(v[2].item())
    metric = EffectiveHeatRatio()
    values = metric.update(None, {"box": boxes}, Attribution(image=maps), "image")
    assert torch.equal(values["ehr"].isnan(), v.isnan()) and torch.allclose(values["ehr"], v, equal_nan=True)
    s = metric.compute()["ehr"]
    assert (s["n"].item(), s["skipped"].item()) == (2, 1)
    assert s["mean"].item() == pytest.approx((v[0] + v[2]).item() / 2)
    relaxed = EffectiveHeatRatio(max_roi_fraction=0.6)
    relaxed.update(None, {"box": boxes}, Attribution(image=maps), "image")
    assert relaxed.compute()["ehr"]["skipped"].item() == 0


def test_functional_equals_modular():
    g = torch.Generator().manual_seed(3)
    maps = torch.rand(5, 8, 8, generator=g)
    masks = torch.rand(5, 8, 8, generator=g) > 0.8
    metric = EffectiveHeatRatio(weighted=False)
    metric.update(None, {"mask": masks[:2]}, Attribution(image=maps[:2]), "image")
    metric.update(None, {"mask": masks[2:]}, Attribution(image=maps[2:]), "image")
    ref = effective_heat_ratio(maps, masks, weighted=False)
    ref = ref[~torch.isnan(ref)]
    assert metric.compute()["ehr"]["mean"].item() == pytest.approx(ref.mean().item())
    assert effective_heat_ratio(maps, masks, weighted=False, num_quantiles=6).shape == (5,)
