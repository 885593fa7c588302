"""AdaIB: Proposition 1 (reduction to M2IB), every f and g option, the MLP rule, batching, the scalars."""

import pytest
import torch
from torchmetrics.functional import spearman_corrcoef

import clipib
from clipib.attribution.adaib import COMPRESSIONS, RELEVANCES, PairMLPs

FAST = dict(steps=4, copies=3)


def _const(value):
    return lambda a, b: torch.full(a.shape[:-1], value)


# Adam is invariant to the factor f up to its ε (1e-8), which is not negligible against the tiny model's
# per-element gradients (~1e-5) once f < 1: hence the looser tolerance there.
@pytest.mark.parametrize("f,g,rtol", [(1.0, 0.1, 1e-6), (2.0, 0.2, 1e-4), (0.25, 0.025, 3e-3)])
def test_proposition_1_reduces_to_m2ib(tiny_clip, pairs, f, g, rtol):
    """f, g constant and no clipping: AdaIB == M2IB with β = g/f (Adam ignores the factor f)."""
    images, ids = pairs
    ada = clipib.AdaIB(tiny_clip, relevance=_const(f), compression=lambda x: torch.full_like(x, g), clip_grad=None)
    m2ib = clipib.M2IB(tiny_clip, beta=g / f)
    a = ada.attribute(images[:2], ids[:2], seeds=[5, 6])
    m = m2ib.attribute(images[:2], ids[:2], seeds=[5, 6])
    torch.testing.assert_close(a.image_grid, m.image_grid, rtol=rtol, atol=1e-6)
    torch.testing.assert_close(a.text_raw, m.text_raw, rtol=rtol, atol=1e-5)
    for mod in ("image", "text"):
        torch.testing.assert_close(a.scalars[f"{mod}_kl"], m.scalars[f"{mod}_kl"], rtol=rtol, atol=1e-7)
        torch.testing.assert_close(a.scalars[f"{mod}_loss"], f * m.scalars[f"{mod}_loss"], rtol=rtol, atol=1e-6)
        torch.testing.assert_close(a.scalars[f"{mod}_beta"], torch.full((2,), g / f))
    # and the reduction is not vacuous: another β gives other maps
    other = clipib.M2IB(tiny_clip, beta=10 * g / f).attribute(images[:2], ids[:2], seeds=[5, 6])
    assert (other.image_grid - m.image_grid).abs().max() > 1e-3 * m.image_grid.abs().max()


def test_clipping_changes_the_trajectory(tiny_clip, pairs):
    images, ids = pairs
    kw = dict(compression="inverse", **FAST)
    on = clipib.AdaIB(tiny_clip, clip_grad=1.0, **kw).attribute(images[:1], ids[:1], "image")
    off = clipib.AdaIB(tiny_clip, clip_grad=None, **kw).attribute(images[:1], ids[:1], "image")
    off_tight = clipib.AdaIB(tiny_clip, clip_grad=1e-4, **kw).attribute(images[:1], ids[:1], "image")
    assert not torch.allclose(on.image_grid, off_tight.image_grid)  # a tight clip bites
    assert torch.isfinite(off.image_grid).all()


@pytest.mark.parametrize("relevance", RELEVANCES)
@pytest.mark.parametrize("compression", COMPRESSIONS)
def test_every_option_runs(tiny_clip, pairs, relevance, compression):
    images, ids = pairs
    method = clipib.AdaIB(tiny_clip, relevance=relevance, compression=compression, **FAST)
    attr = method.attribute(images[:2], ids[:2])
    for t in (attr.image, attr.text, attr.image_grid, attr.text_raw):
        assert torch.isfinite(t).all()
    assert attr.image.max() == 1 and attr.text.max() == 1  # not flat
    f, g = attr.scalars["image_f"], attr.scalars["image_g"]
    assert (f > 0).all() and (g > 0).all()
    e_img, e_txt = tiny_clip.image.encode(images[:2]), tiny_clip.text.encode(ids[:2])
    expected = {"l2": 1 / ((e_img - e_txt).norm(dim=-1) + method.eps_f),
                "l1": 1 / ((e_img - e_txt).abs().sum(-1) + method.eps_f),
                "chebyshev": 1 / ((e_img - e_txt).abs().amax(-1) + method.eps_f),
                "cosine": torch.nn.functional.softplus(method.tau * (1 + (e_img * e_txt).sum(-1)) / 2) + method.eps_f}
    torch.testing.assert_close(f, expected[relevance], rtol=1e-5, atol=1e-6)
    closed = 1 / (f + method.eps_g)
    if compression == "inverse":
        torch.testing.assert_close(g, closed)
    else:  # the MLP's regression target
        torch.testing.assert_close(g.log(), closed.log(), rtol=0, atol=0.1)


def test_relevance_from_bottleneck(tiny_clip, pairs):
    images, ids = pairs
    clean = clipib.AdaIB(tiny_clip, compression="mlp", **FAST).attribute(images[:2], ids[:2], "image")
    noisy = clipib.AdaIB(tiny_clip, compression="mlp", relevance_from="bottleneck", **FAST).attribute(
        images[:2], ids[:2], "image")
    f_clean, f_noisy, g = clean.scalars["image_f"], noisy.scalars["image_f"], noisy.scalars["image_g"]
    assert ((f_noisy - f_clean).abs() > 1e-3).all()  # f now follows the bottlenecked embedding
    torch.testing.assert_close(g.log(), (1 / (f_noisy + 1e-3)).log(), rtol=0, atol=0.05)  # and g follows f


def test_mlp_rule_does_not_collapse(tiny_clip, pairs):
    """The MLP's g sits at eq. 13's value, far above its floor ε_g, and its KL term shapes the map."""
    images, ids = pairs
    mlp = clipib.AdaIB(tiny_clip, compression="mlp").attribute(images, ids, seeds=[1, 2, 3, 4])
    floor = clipib.AdaIB(tiny_clip, compression=lambda f: torch.full_like(f, 1e-6)).attribute(
        images, ids, seeds=[1, 2, 3, 4])
    for mod in ("image", "text"):
        f, g = mlp.scalars[f"{mod}_f"], mlp.scalars[f"{mod}_g"]
        assert (g > 100 * 1e-3).all()  # ε_g = 1e-3
        torch.testing.assert_close(g, 1 / (f + 1e-3), rtol=0.05, atol=0)
        assert (mlp.scalars[f"{mod}_kl"] < 0.7 * floor.scalars[f"{mod}_kl"]).all()  # it compresses
    diff = (mlp.image - floor.image).abs().flatten(1).amax(1)
    assert (diff > 0.05).all(), diff
    assert spearman_corrcoef(mlp.image_grid.flatten(), floor.image_grid.flatten()) < 0.999


def test_maximising_the_objective_over_g_collapses():
    """Why clipib does not train the MLP on the objective: ∂L/∂g = −KL < 0 drives g to ε_g."""
    f, kl = torch.tensor([0.5, 1.0, 2.0]), torch.tensor([0.05, 0.1, 0.2])
    mlps = PairMLPs(3, 32, 1e-3, 0.05, 0, f)
    start = mlps(f).detach()
    for _ in range(200):
        loss = (mlps(f) * kl).sum()  # minimising g·KL − f·fit over φ == maximising the objective
        mlps.opt.zero_grad()
        loss.backward()
        mlps.opt.step()
    end = mlps(f).detach()
    assert (end < 1e-3 * 1.5).all() and (start > 0.3).all(), (start, end)


def test_batch_equals_single(tiny_clip, pairs):
    images, ids = pairs
    method = clipib.AdaIB(tiny_clip, compression="mlp", **FAST)
    batch = method.attribute(images, ids, seeds=[5, 6, 7, 8])
    for i in range(4):
        one = method.attribute(images[i : i + 1], ids[i : i + 1], seeds=[5 + i])
        torch.testing.assert_close(batch.image_grid[i], one.image_grid[0], rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(batch.text_raw[i], one.text_raw[0], rtol=1e-4, atol=1e-5)
        for key, value in batch.scalars.items():
            torch.testing.assert_close(value[i], one.scalars[key][0], rtol=1e-4, atol=1e-6)


def test_matched_and_mismatched_scalars(tiny_clip, pairs):
    images, ids = pairs
    method = clipib.AdaIB(tiny_clip, **FAST)
    matched = method.attribute(images, ids)
    mismatched = method.attribute(images, ids.roll(1, 0))
    keys = {f"{m}_{k}" for m in ("image", "text") for k in ("f", "g", "fit", "kl", "loss", "beta")}
    for attr in (matched, mismatched):
        assert set(attr.scalars) == keys
        assert all(torch.isfinite(v).all() and v.shape == (4,) for v in attr.scalars.values())
    assert not torch.allclose(matched.scalars["image_f"], mismatched.scalars["image_f"])


def test_defaults_and_bad_settings(tiny_clip):
    method = clipib.AdaIB(tiny_clip)
    assert method.layer_for(tiny_clip.image) == clipib.M2IB(tiny_clip).layer_for(tiny_clip.image)
    assert (method.PAPER_LAYER, method.seed, method.relevance, method.compression) == (10, 42, "l2", "inverse")
    assert method.bottleneck.clip_grad == 1.0 and (method.bottleneck.steps, method.bottleneck.copies) == (10, 10)
    for bad in (dict(relevance="l3"), dict(compression="mlp2"), dict(relevance_from="z"), dict(eps_g=0.0)):
        with pytest.raises(ValueError):
            clipib.AdaIB(tiny_clip, **bad)
