"""Localization IoU (M2IB eq. 16), pointing-game IoU (AdaIB) and the classic pointing game."""
import math

import pytest
import torch

from clipib.attribution import Attribution
from clipib.metrics import (
    Localization,
    PointingGame,
    boxes_to_mask,
    localization_iou,
    pointing_game,
    pointing_game_iou,
)


def _mask(h, w, y0, y1, x0, x1):
    m = torch.zeros(1, h, w, dtype=torch.bool)
    m[0, y0:y1, x0:x1] = True
    return m


@pytest.mark.parametrize("box", [(2, 4, 2, 5), (0, 6, 0, 5)])  # 6/64 px and 30/64 px (>25 %)
def test_map_equal_to_mask_is_perfect(box):
    gt = _mask(8, 8, *box)
    maps = gt.float()
    assert localization_iou(maps, gt).item() == 1.0
    assert pointing_game_iou(maps, gt).item() == 1.0
    assert pointing_game(maps, gt).item() == 1.0


def test_constant_map_gives_area_fraction_not_nan():
    gt = _mask(8, 8, 0, 4, 0, 4)  # 16 / 64
    maps = torch.full((1, 8, 8), 0.3)
    for fn in (localization_iou, pointing_game_iou, pointing_game):
        v = fn(maps, gt).item()
        assert not math.isnan(v)
        assert v == pytest.approx(0.25)


def test_percentile_hand_case():
    maps = torch.arange(16.0).view(1, 4, 4)  # 75th pct (linear) = 11.25 -> values 12..15 = bottom row
    box = torch.tensor([[0.0, 2.0, 4.0, 4.0]])  # bottom two rows, 8 px
    assert localization_iou(maps, box).item() == pytest.approx(4 / 8)
    # q = 0.5: threshold 7.5 -> bottom two rows exactly
    assert localization_iou(maps, box, q=0.5).item() == pytest.approx(1.0)
    # pointing-game IoU: normalised >= 0.5 -> values >= 7.5 -> bottom two rows
    assert pointing_game_iou(maps, box).item() == pytest.approx(1.0)
    assert pointing_game_iou(maps, box, threshold=0.9).item() == pytest.approx(2 / 8)


def test_boxes_union_nan_padding_and_pixel_centres():
    boxes = torch.tensor([[[0.0, 0.0, 1.0, 1.0], [2.4, 2.6, 4.0, 4.0], [math.nan] * 4]])
    m = boxes_to_mask(boxes, (4, 4))
    # exact: rows with centre in [2.6, 4) -> row 3; cols with centre in [2.4, 4) -> cols 2, 3
    exact = torch.zeros(1, 4, 4, dtype=torch.bool)
    exact[0, 0, 0] = True
    exact[0, 3, 2:] = True
    assert torch.equal(m, exact)


def test_pointing_game_ties_and_tolerance():
    maps = torch.zeros(1, 5, 5)
    maps[0, 0, 0] = 1.0
    maps[0, 4, 4] = 1.0
    gt = _mask(5, 5, 3, 5, 3, 5)
    assert pointing_game(maps, gt).item() == pytest.approx(0.5)  # one of two maxima inside
    maps2 = torch.zeros(1, 5, 5)
    maps2[0, 0, 0] = 1.0
    gt2 = _mask(5, 5, 0, 5, 3, 5)
    assert pointing_game(maps2, gt2).item() == 0.0
    assert pointing_game(maps2, gt2, tolerance=2.9).item() == 0.0
    assert pointing_game(maps2, gt2, tolerance=3).item() == 1.0


def test_empty_target_is_skipped_and_counted():
    maps = torch.rand(2, 4, 4, generator=torch.Generator().manual_seed(0))
    boxes = torch.tensor([[0.0, 0.0, 2.0, 2.0], [5.0, 5.0, 6.0, 6.0]])  # second box outside the map
    assert math.isnan(localization_iou(maps, boxes)[1].item())
    metric = Localization()
    metric.update(None, {"box": boxes}, Attribution(image=maps), "image")
    s = metric.compute()["iou"]
    assert s["n"].item() == 1 and s["skipped"].item() == 1
    assert s["mean"].item() == pytest.approx(localization_iou(maps, boxes)[0].item())


@pytest.mark.parametrize(
    "cls,value,fn,kw",
    [(Localization, "iou", localization_iou, {"q": 0.6}),
     (PointingGame, "pg_iou", pointing_game_iou, {"threshold": 0.4}),
     (PointingGame, "pointing_game", pointing_game, {"tolerance": 1.0})],
)
def test_functional_equals_modular(cls, value, fn, kw):
    g = torch.Generator().manual_seed(1)
    maps = torch.rand(6, 8, 8, generator=g)
    xy = torch.randint(0, 5, (6, 2), generator=g).float()
    boxes = torch.cat([xy, xy + 3], dim=1)
    metric = cls(**kw)
    metric.update(None, {"box": boxes[:4]}, Attribution(image=maps[:4]), "image")
    metric.update(None, {"box": boxes[4:]}, Attribution(image=maps[4:]), "image")
    ref = fn(maps, boxes, *kw.values())
    s = metric.compute()[value]
    assert s["mean"].item() == pytest.approx(ref.mean().item())
    assert s["std"].item() == pytest.approx(ref.std().item())


def test_bad_input_is_one_clear_error():
    with pytest.raises(ValueError, match="target must be"):
        localization_iou(torch.rand(1, 4, 4), torch.zeros(1, 3))
    with pytest.raises(ValueError, match="NaN"):
        localization_iou(torch.full((1, 4, 4), math.nan), torch.tensor([[0.0, 0.0, 2.0, 2.0]]))


def test_bool_mask_vs_boxes_with_four_pixel_wide_maps():
    maps = torch.zeros(2, 4, 4)
    maps[:, 0, 0] = 1.0
    boxes = torch.tensor([[[0.0, 0.0, 1.0, 1.0]] * 4] * 2)  # [B, K=4, 4]: box-shaped and map-shaped
    assert pointing_game(maps, boxes).tolist() == [1.0, 1.0]
    mask = torch.zeros(2, 4, 4, dtype=torch.bool)
    mask[:, 3, 3] = True
    assert pointing_game(maps, mask).tolist() == [0.0, 0.0]
