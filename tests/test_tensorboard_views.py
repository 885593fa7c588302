"""Pieces of the TensorBoard views: the ROC kernel, the hparams experiment, gallery tile marks, the ROC figure."""

import numpy as np
import pytest
import torch

from clipib.callbacks.gallery import tile_title, value_lines
from clipib.callbacks.tensorboard import experiment_summary
from clipib.metrics import mismatch_auroc, mismatch_roc
from clipib.viz import roc_figure


@pytest.mark.parametrize("orientation", ["matched_high", "matched_low", "either_optimistic"])
def test_roc_area_is_the_auroc(orientation):
    gen = torch.Generator().manual_seed(0)
    scores = torch.randint(0, 6, (40,), generator=gen).double()  # many ties
    matched = torch.rand(40, generator=gen) < 0.6
    fpr, tpr = mismatch_roc(scores, matched, orientation)
    assert fpr[0] == tpr[0] == 0 and fpr[-1] == tpr[-1] == 1 and (fpr.diff() >= 0).all() and (tpr.diff() >= 0).all()
    area = float(torch.trapezoid(tpr, fpr))
    assert area == pytest.approx(float(mismatch_auroc(scores, matched, orientation)), abs=1e-6)


def test_experiment_lists_method_first_and_every_setting():
    from tensorboard.plugins.hparams import api_pb2
    from tensorboard.plugins.hparams.plugin_data_pb2 import HParamsPluginData

    table = {"m2ib": {"method": "m2ib", "beta": 0.1, "steps": 10.0}, "fast": {"method": "grad_cam", "layer": "default"}}
    exp = experiment_summary(table, ["summary/iou", "summary/pointing_game"])
    content = HParamsPluginData.FromString(exp.value[0].metadata.plugin_data.content).experiment
    infos = {h.name: h for h in content.hparam_infos}
    assert set(infos) == {"method", "beta", "steps", "layer"} and infos["method"].differs
    assert infos["beta"].type == api_pb2.DATA_TYPE_FLOAT64 and infos["layer"].type == api_pb2.DATA_TYPE_STRING
    assert [m.name.tag for m in content.metric_infos] == ["summary/iou", "summary/pointing_game"]


def test_gallery_tiles_say_matched_and_show_values():
    batch = {"key": ["a", "b"], "matched": torch.tensor([True, False])}
    assert tile_title("m2ib", batch, 0) == ("m2ib · a · matched", "#1a7f37")
    assert tile_title("m2ib", batch, 1) == ("m2ib · b · MISMATCHED", "#cf222e")
    assert tile_title("m2ib", {"key": ["a"]}, 0) == ("m2ib · a", None)
    lines = value_lines({"key": "a", "method": "m2ib", "seed": 0, "iou": 0.41234, "pointing_game": True,
                         "text_drop": None}, width=20)
    assert lines.splitlines() == ["iou 0.412", "pointing_game 1"]


def test_roc_figure_draws_each_curve():
    curves = {"m2ib": ([0, 0, 1], [0, 1, 1], 1.0), "nib": ([0, 1], [0, 1], 0.5)}
    fig = np.asarray(roc_figure(curves, "test"))
    for colour in ((0x4E, 0x79, 0xA7), (0xF2, 0x8E, 0x2B)):  # the first two line colours appear
        assert (fig == colour).all(-1).sum() > 100
