"""Quantus 0.6.0 as an independent oracle for the randomisation and robustness metrics (test-only; LGPL, never
imported by clipib). Quantus is in the `dev` extra, so `make test` runs these (skipped only where it is not installed); the hand-computed
cases of tests/test_metrics_sanity.py always run.

- MPRT's per-layer score (Spearman of max-normalised absolute maps) == our ``rho_abs``; RandomLogit's default
  similarity (SSIM) == our ``ssim``. The steps differ by definition (docs/metrics.md): Quantus resets every
  module with ``reset_parameters`` one at a time over the whole model and explains another class; clipib
  randomises the attributed tower block by block and explains another caption.
- MaxSensitivity / AvgSensitivity on the tiny model wrapped as a Quantus classifier, fed our noise, equal ours.
"""
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import clipib
from clipib.metrics import Sensitivity
from clipib.metrics.map_similarity import compare, spearman, ssim
from clipib.metrics.robustness import pixel_noise

quantus = pytest.importorskip("quantus")
from quantus.functions.normalise_func import normalise_by_max  # noqa: E402
from quantus.functions.similarity_func import correlation_spearman  # noqa: E402
from quantus.functions.similarity_func import ssim as q_ssim  # noqa: E402

SEEDS = [3, 4, 5, 6]


def test_spearman_and_ssim_match_quantus():
    g = torch.Generator().manual_seed(0)
    a = torch.randn(5, 16, 16, generator=g).round(decimals=1)  # rounded: ties
    b = (a + torch.randn(5, 16, 16, generator=g)).round(decimals=1)
    ours_rho = spearman(a.flatten(1), b.flatten(1))
    ours_ssim = ssim(a, b)
    for i in range(5):
        x, y = a[i].numpy().astype(np.float64), b[i].numpy().astype(np.float64)
        assert ours_rho[i].item() == pytest.approx(correlation_spearman(x.ravel(), y.ravel()), abs=1e-9)
        assert ours_ssim[i].item() == pytest.approx(q_ssim(x, y), abs=1e-9)


def test_rho_abs_is_mprts_layer_score(tiny_clip, pairs):
    """MPRT (abs=True, normalise=True, Spearman) scores two maps as our ``rho_abs`` does."""
    images, ids = pairs
    g = torch.Generator().manual_seed(1)
    grids = [torch.randn(4, *tiny_clip.grid, generator=g) for _ in range(2)]
    attrs = [clipib.attribution.base.to_maps(tiny_clip, ids, image=grid) for grid in grids]
    ours = compare(tiny_clip, attrs[0], attrs[1], ids, "image")["rho_abs"]
    for i in range(4):
        x, y = (normalise_by_max(np.abs(grid[i].numpy().ravel())) for grid in grids)
        assert ours[i].item() == pytest.approx(correlation_spearman(x, y), abs=1e-9)


class _Classifier(nn.Module):
    """The tiny CLIP as a Quantus classifier: logits = cosine of the image with each of the batch's captions."""

    def __init__(self, clip, ids):
        super().__init__()
        self.clip, self.ids = clip, ids

    def forward(self, x):
        return self.clip.image.encode(x) @ self.clip.text.encode(self.ids).T  # [B, captions]


def test_sensitivity_matches_quantus(tiny_clip, pairs):
    images, ids = pairs
    method = clipib.METHODS["saliency"](tiny_clip)
    scale = images.shape[-1] // tiny_clip.grid[1]

    def explain(model, inputs, targets, **kwargs):  # our grid map, nearest-upsampled to the input: same norms ratio
        attr = method.attribute(torch.as_tensor(inputs), ids, "image", seeds=SEEDS)
        return F.interpolate(attr.image_grid[:, None], scale_factor=scale, mode="nearest").numpy()

    draws = iter(range(100))
    std = tiny_clip.normalization[1]

    def perturb(arr, indices, **kwargs):  # our noise, sample by sample
        return arr + pixel_noise(images.shape, SEEDS, next(draws), 0.1, "uniform", std).flatten(1).numpy()

    x = images.numpy()
    y = np.arange(4)
    a = explain(None, x, y)
    attr = method.attribute(images, ids, "image", seeds=SEEDS)
    ours = Sensitivity(samples=3, radius=0.1).update(tiny_clip, {"image": images, "ids": ids}, attr, "image",
                                                     method=method, seeds=SEEDS)
    for cls, key in ((quantus.MaxSensitivity, "image_max_sens"), (quantus.AvgSensitivity, "image_avg_sens")):
        draws = iter(range(100))
        metric = cls(nr_samples=3, perturb_func=perturb, normalise=False, abs=False, disable_warnings=True)
        theirs = metric(model=_Classifier(tiny_clip, ids), x_batch=x, y_batch=y, a_batch=a, explain_func=explain,
                        device="cpu", channel_first=True)
        assert np.allclose(ours[key].numpy(), np.asarray(theirs), rtol=1e-4, atol=1e-6), (key, ours[key], theirs)
