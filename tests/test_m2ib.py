"""M2IB: shapes, masking, batching, seeds, saturation, agreement with the reference-shaped loop; σ, IBA-style
feature statistics and the pre-clip gradient-norm scalars (issue #15)."""

import math

import pytest
import torch
from torch.distributions import Normal, kl_divergence
from torchmetrics.functional import spearman_corrcoef

import clipib
from clipib.attribution.bottleneck import Bottleneck, kl_elementwise
from clipib.attribution.feature_stats import FeatureStats, TowerStats
from clipib.bench.reference_loops import m2ib_pair


def test_shapes_and_ranges(tiny_clip, pairs):
    images, ids = pairs
    attr = clipib.M2IB(tiny_clip).attribute(images, ids)
    b, (h, w), grid = images.shape[0], tiny_clip.image_size, tiny_clip.grid
    assert attr.image.shape == (b, h, w) and attr.image_grid.shape == (b, *grid)
    assert attr.text.shape == ids.shape and attr.text_raw.shape == ids.shape
    for t in (attr.image, attr.text):
        assert torch.isfinite(t).all() and t.min() >= 0 and t.max() <= 1
    outside = ~tiny_clip.text.span_mask(ids)
    assert (attr.text[outside] == 0).all() and (attr.text_raw[outside] == 0).all()
    assert (attr.image_grid > 0).all()  # capacities are KLs: positive nats
    assert set(attr.scalars) == {f"{m}_{k}" for m in ("image", "text") for k in ("kl", "fit", "loss")}


def test_layer_default_scales_with_depth(tiny_clip):
    m = clipib.M2IB(tiny_clip)
    assert m.layer_for(tiny_clip.image) == 2  # 10/12 of 3 blocks = 2.5, at most n_layers - 1
    torch.manual_seed(0)
    big = clipib.load_clip("ViT-B-32-quickgelu", pretrained=None)
    assert clipib.M2IB(big).layer_for(big.image) == 10 and clipib.NIB(big).layer_for(big.text) == 9


def test_batch_equals_single_and_padding_invariance(tiny_clip, pairs):
    images, ids = pairs
    method = clipib.M2IB(tiny_clip, seed=3)
    batch = method.attribute(images, ids, seeds=[5, 6, 7, 8])
    for i in range(4):
        one = method.attribute(images[i : i + 1], ids[i : i + 1], seeds=[5 + i])
        torch.testing.assert_close(batch.image_grid[i], one.image_grid[0], rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(batch.text_raw[i], one.text_raw[0], rtol=1e-4, atol=1e-5)
    # the shortest caption (index 3) was padded by a batch-mate 9 tokens longer: same map as alone (above)
    assert int(tiny_clip.text.eot_positions(ids).max()) > int(tiny_clip.text.eot_positions(ids[3:]).max()) + 5


def test_seeds(tiny_clip, pairs):
    images, ids = pairs
    m = clipib.M2IB(tiny_clip)
    a, b, c = (m.attribute(images[:1], ids[1:2], seeds=[s]) for s in (0, 0, 1))
    torch.testing.assert_close(a.image, b.image, rtol=0, atol=0)
    torch.testing.assert_close(a.text, b.text, rtol=0, atol=0)
    assert not torch.equal(a.image_grid, c.image_grid)
    rho = spearman_corrcoef(a.image_grid.flatten(), c.image_grid.flatten())
    assert rho > 0.5, rho


def test_long_run_stays_finite(tiny_clip, pairs):
    images, ids = pairs
    gen = [torch.Generator().manual_seed(0)]
    target = tiny_clip.text.encode(ids[:1])
    # an objective that rewards keeping information pushes α up by ~lr per Adam step
    res = Bottleneck(steps=100, lr=1.0, copies=2).run(
        tiny_clip.image, images[:1], 2, target, gen, lambda e, t, kl: -kl - (e * t[:, None]).sum(-1).mean(1)
    )
    assert torch.isfinite(res.alpha).all() and res.alpha.max() > 17  # past the point where 1 - sigmoid(α) == 0 in fp32 ...
    lam = torch.sigmoid(res.alpha)
    assert not torch.isfinite(torch.log((1 - lam) ** 2)).all()  # ... where the reference's KL is inf
    for t in (res.capacity, res.kl, res.loss, res.fit):
        assert torch.isfinite(t).all()


def test_reproduces_reference_stream(tiny_clip, pairs):
    """clipib's batched M2IB with seeds=[s] == the official loop shape after torch.manual_seed(s)."""
    images, ids = pairs
    method = clipib.M2IB(tiny_clip, steps=4, copies=3)
    k = method.layer_for(tiny_clip.image)
    batch = method.attribute(images[:2], ids[:2], seeds=[11, 12])
    for i, seed in enumerate((11, 12)):
        img_cap, txt_cap = m2ib_pair(tiny_clip.model, images[i : i + 1], ids[i : i + 1], k, seed, steps=4, copies=3)
        torch.testing.assert_close(batch.image_grid[i].flatten(), img_cap[1:], rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(batch.text_raw[i, : txt_cap.shape[0]], txt_cap, rtol=1e-4, atol=1e-5)


# --- issue #15: σ (App. A), IBA-style feature statistics, pre-clip gradient norms ---------------------------------

@pytest.mark.parametrize("sigma", [1.0, math.sqrt(0.1), 0.1])
def test_kl_with_sigma_matches_torch_distributions(sigma):
    alpha, h = torch.linspace(-4, 8, 50), torch.linspace(-3, 3, 50)
    lam = torch.sigmoid(alpha)
    expected = kl_divergence(Normal(lam * h, sigma * (1 - lam)), Normal(0.0, 1.0))
    torch.testing.assert_close(kl_elementwise(alpha, h, sigma), expected, rtol=1e-5, atol=1e-5)


def test_sigma_one_is_the_default_and_sigma_changes_the_map(tiny_clip, pairs):
    images, ids = pairs
    base = clipib.M2IB(tiny_clip).attribute(images[:2], ids[:2], seeds=[1, 2])
    one = clipib.M2IB(tiny_clip, sigma=1.0).attribute(images[:2], ids[:2], seeds=[1, 2])
    small = clipib.M2IB(tiny_clip, sigma=math.sqrt(0.01)).attribute(images[:2], ids[:2], seeds=[1, 2])
    assert torch.equal(base.image_grid, one.image_grid) and torch.equal(base.text_raw, one.text_raw)
    assert not torch.allclose(small.image_grid, base.image_grid, rtol=1e-2)
    assert not torch.allclose(small.text_raw, base.text_raw, rtol=1e-2)
    assert (small.scalars["image_kl"] > base.scalars["image_kl"]).all()  # "smaller σ: higher KL" (App. A)
    for bad in (0.0, -1.0, float("nan")):
        with pytest.raises(ValueError):
            clipib.M2IB(tiny_clip, sigma=bad)


def _first_pass(tiny_clip, image, text, seed, sigma, stats, copies=2, beta=0.1):
    """Independent computation of M2IB's first forward pass on one image: ``(capacity [T], fit, loss, |∂loss/∂α|)``."""
    tower, k = tiny_clip.image, 2
    with torch.no_grad():
        h = tower.prefix(image, k)[0]  # [T, D]
        target = tiny_clip.text.encode(text)
    mean, std = stats if stats is not None else (torch.zeros(h.shape[-1]), torch.ones(h.shape[-1]))
    eps = torch.randn(copies, *h.shape, generator=torch.Generator().manual_seed(seed))
    alpha = torch.full_like(h, 5.0, requires_grad=True)
    lam = torch.sigmoid(alpha)
    h_n = (h - mean) / std
    z = std * (lam * h_n + sigma * (1 - lam) * eps) + mean  # IBA: noise in normalised units, then de-normalised
    emb = tower.suffix(z, k, image.expand(copies, -1, -1, -1))
    fit = (emb @ target[0]).mean()
    kl = kl_divergence(Normal(lam * h_n, sigma * (1 - lam)), Normal(0.0, 1.0))  # [T, D]
    loss = beta * kl.mean() - fit
    (grad,) = torch.autograd.grad(loss, alpha)
    return kl.detach().sum(-1), fit.detach(), loss.detach(), grad.norm()


@pytest.mark.parametrize("sigma", [1.0, 0.3])
@pytest.mark.parametrize("with_stats", [False, True])
def test_first_pass_against_an_independent_computation(tiny_clip, pairs, sigma, with_stats):
    """σ scales the noise and enters the KL; feature statistics normalise the stream and shift / scale the noise.
    Checked on the capacity, fit and loss of the first pass (steps=1) and on the one update's gradient norm."""
    images, ids = pairs
    d = tiny_clip.image.prefix(images[:1], 2).shape[-1]
    gen = torch.Generator().manual_seed(7)
    stats = (torch.randn(d, generator=gen), 0.5 + torch.rand(d, generator=gen)) if with_stats else None
    fs = FeatureStats({"image": TowerStats(2, *stats, 10, 2)}) if with_stats else None
    cap, fit, loss, gnorm = _first_pass(tiny_clip, images[:1], ids[1:2], 3, sigma, stats)
    one = clipib.M2IB(tiny_clip, steps=1, copies=2, sigma=sigma, feature_stats=fs, pooled_last_block=False)
    attr = one.attribute(images[:1], ids[1:2], "image", seeds=[3])
    torch.testing.assert_close(attr.image_grid[0].flatten(), cap[1:], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(attr.scalars["image_fit"][0], fit, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(attr.scalars["image_loss"][0], loss, rtol=1e-4, atol=1e-6)
    two = clipib.M2IB(tiny_clip, steps=2, copies=2, sigma=sigma, feature_stats=fs, record_grad_norm=True,
                      pooled_last_block=False).attribute(images[:1], ids[1:2], "image", seeds=[3])
    torch.testing.assert_close(two.scalars["image_grad_norm"][0], gnorm, rtol=1e-4, atol=0)
    torch.testing.assert_close(two.scalars["image_grad_norm_max"][0], gnorm, rtol=1e-4, atol=0)
    assert two.scalars["image_clipped"][0] == 0  # M2IB does not clip


def test_identity_statistics_change_nothing(tiny_clip, pairs):
    """mean 0, std 1 per channel: IBA's rule reduces to the reference's."""
    images, ids = pairs
    d = tiny_clip.image.prefix(images[:1], 2).shape[-1]
    dt = tiny_clip.text.prefix(ids[:1], 2).shape[-1]
    fs = FeatureStats({"image": TowerStats(2, torch.zeros(d), torch.ones(d), 1, 1),
                       "text": TowerStats(2, torch.zeros(dt), torch.ones(dt), 1, 1)})
    a = clipib.M2IB(tiny_clip, feature_stats=fs).attribute(images[:2], ids[:2], seeds=[1, 2])
    b = clipib.M2IB(tiny_clip).attribute(images[:2], ids[:2], seeds=[1, 2])
    torch.testing.assert_close(a.image_grid, b.image_grid, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(a.text_raw, b.text_raw, rtol=1e-5, atol=1e-6)


def test_grad_norm_scalars_are_opt_in(tiny_clip, pairs):
    images, ids = pairs
    attr = clipib.M2IB(tiny_clip, steps=3, copies=2, record_grad_norm=True).attribute(images[:2], ids[:2])
    keys = {f"{m}_{k}" for m in ("image", "text") for k in ("grad_norm", "grad_norm_max", "clipped")}
    assert keys <= set(attr.scalars)
    single = clipib.M2IB(tiny_clip, steps=1, copies=2, record_grad_norm=True).attribute(images[:1], ids[:1], "image")
    assert single.scalars["image_grad_norm"][0] == 0  # no update, no gradient: 0 by definition
