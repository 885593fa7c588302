"""NIB: determinism, equality with an independent evaluation of the same sum, completeness of a dense path."""

import copy

import pytest
import torch

import clipib
from clipib.attribution.nib import log_trapezoid_path
from clipib.bench.reference_loops import nib_map


@pytest.fixture(scope="module")
def clip64(tiny_clip):
    """The tiny model in float64, for finite differences."""
    return copy.deepcopy(tiny_clip).double()


def _cos(tower, k, z, x, target):
    return (tower.suffix(z, k, x.expand(z.shape[0], *x.shape[1:])) * target).sum(-1)


def _close(a, b, rel=1e-3):
    """Max abs difference within ``rel`` of the larger map's max magnitude (float32 batching noise)."""
    assert (a - b).abs().max() <= rel * max(a.abs().max(), b.abs().max()), (a, b)


def test_deterministic_and_batch_equals_single(tiny_clip, pairs):
    images, ids = pairs
    nib = clipib.NIB(tiny_clip)
    a, b = nib.attribute(images, ids), nib.attribute(images, ids)
    torch.testing.assert_close(a.image_grid, b.image_grid, rtol=0, atol=0)
    for i in range(4):
        one = nib.attribute(images[i : i + 1], ids[i : i + 1])
        _close(a.image_grid[i], one.image_grid[0])
        _close(a.text_raw[i], one.text_raw[0])
    chunked = clipib.NIB(tiny_clip, internal_batch_size=7).attribute(images, ids)
    _close(chunked.text_raw, a.text_raw)
    assert (a.image_grid < 0).any()  # signed


def test_equals_central_differences(clip64, pairs):
    """A_t = (1/m) Σ_i d/dε cos(f(λ_i h + ε h_t e_t)) at ε = 0, by float64 central differences."""
    images, ids = pairs
    x, m, eps = ids[1:2], 10, 1e-6
    nib = clipib.NIB(clip64, steps=m)
    tower, k = clip64.text, nib.layer_for(clip64.text)
    target = clip64.image.encode(images[1:2].double())
    scores = nib.scores(tower, x, target)[0]  # [L]
    h = tower.prefix(x, k)[0]  # [L, D]
    with torch.no_grad():
        for t in range(h.shape[0]):
            bump = torch.zeros_like(h)
            bump[t] = h[t] * eps
            total = 0.0
            for i in range(1, m + 1):
                lam = i / m
                z = torch.stack([lam * h + bump, lam * h - bump])
                up, down = _cos(tower, k, z, x, target)
                total += float(up - down) / (2 * eps) / m
            assert abs(scores[t].item() - total) < 1e-6 + 1e-5 * abs(total), (t, scores[t].item(), total)


def test_matches_reference_loop(tiny_clip, pairs):
    images, ids = pairs
    nib = clipib.NIB(tiny_clip)
    attr = nib.attribute(images[:1], ids[:1])
    k = nib.layer_for(tiny_clip.image)
    ref_img = nib_map(tiny_clip.model, "image", images[:1], ids[:1], k)
    ref_txt = nib_map(tiny_clip.model, "text", images[:1], ids[:1], k)
    _close(attr.image_grid[0].flatten(), ref_img[1:])
    _close(attr.text_raw[0, : 4], ref_txt[:4])


def test_dense_log_path_is_complete(clip64, pairs):
    images, ids = pairs
    for tower, x, target in (
        (clip64.text, ids[1:2], clip64.image.encode(images[1:2].double())),
        (clip64.image, images[:1].double(), clip64.text.encode(ids[:1])),
    ):
        nib = clipib.NIB(clip64, steps=2000, path="log")
        k = nib.layer_for(tower)
        total = nib.scores(tower, x, target).sum().item()
        with torch.no_grad():
            h = tower.prefix(x, k)
            gap = (_cos(tower, k, h, x, target) - _cos(tower, k, torch.zeros_like(h), x, target)).item()
        assert abs(total - gap) < 2e-5, (total, gap)  # 5 decimals


def test_log_path_weights():
    lam, w = log_trapezoid_path(50)
    assert lam[0] == 0 and lam[-1] == 1 and torch.isclose(w.sum(), torch.tensor(1.0, dtype=w.dtype))
