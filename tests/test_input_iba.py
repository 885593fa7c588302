"""InputIBA: App. A's KL against the learned prior (eqs. 8-10) vs Monte Carlo, and the generator fits."""

import pytest
import torch

import clipib
from clipib.attribution.input_prior import PriorFit, input_kl


def test_input_kl_matches_monte_carlo():
    """eq. 10 equals E_{z ~ P(Z_I|I)}[log P(z|I) − log P(z)] with P(Z_I|I) of eq. 8 and the prior of eq. 9,
    both built here from their definitions (sampled through the masks, not from eq. 10)."""
    g = torch.Generator().manual_seed(0)
    n = 6
    alpha, alpha_g = torch.randn(n, generator=g) * 2, torch.randn(n, generator=g) * 2
    u, mu = torch.randn(n, generator=g), torch.randn(n, generator=g)
    sigma = torch.rand(n, generator=g) + 0.5
    lam, lam_g = torch.sigmoid(alpha), torch.sigmoid(alpha_g)
    m = 400_000
    eps = mu + sigma * torch.randn(m, n, generator=g)
    z_g = lam_g * u + (1 - lam_g) * eps  # Z_G
    # Z_I = Λ Z_G + (1−Λ) ε: eq. 9's variance (1−λ_GΛ)²σ² holds when Z_G and Z_I share one noise draw
    prior_samples = lam * z_g + (1 - lam) * eps
    post = torch.distributions.Normal(lam * u + (1 - lam) * mu, (1 - lam) * sigma)  # eq. 8
    prior = torch.distributions.Normal(lam_g * lam * u + (1 - lam_g * lam) * mu, (1 - lam_g * lam) * sigma)
    torch.testing.assert_close(prior_samples.mean(0), prior.mean, atol=0.02, rtol=0)
    torch.testing.assert_close(prior_samples.std(0), prior.stddev, atol=0.02, rtol=0.01)
    z = lam * u + (1 - lam) * (mu + sigma * torch.randn(m, n, generator=g))  # Z_I | I, eq. 8
    mc = (post.log_prob(z) - prior.log_prob(z)).mean(0)
    closed = input_kl(alpha, alpha_g, u, mu, sigma)
    torch.testing.assert_close(closed, mc, atol=0.02, rtol=0.02)
    assert (closed >= 0).all() and closed.max() > 0.05  # a real divergence, not a trivially zero one


def test_input_kl_finite_at_saturated_masks():
    alpha = torch.tensor([40.0, -40.0, 40.0])
    kl = input_kl(alpha, torch.tensor([40.0, 0.0, -40.0]), torch.ones(3), torch.zeros(3), torch.ones(3))
    assert torch.isfinite(kl).all() and kl[1] < 1e-6  # Λ = 0: posterior = prior


@pytest.mark.parametrize("fit", ["wgan", "moments"])
def test_prior_fits_run(tiny_clip, pairs, fit):
    """Both generator fits run on the tiny model, move the prior and give finite pixel maps; an unknown fit is one
    clear error."""
    images, ids = pairs
    small = dict(steps=2, text_steps=2, copies=2, feat_steps=2, gan_epochs=3, gan_samples=4, gan_batch=4,
                 critic_iter=1, gan_lr=0.05, prior_fit=fit)
    attr = clipib.InputIBA(tiny_clip, **small).attribute(images[:2], ids[:2], modality="image", seeds=[1, 2])
    assert attr.image.shape == (2, *tiny_clip.image_size) and torch.isfinite(attr.image).all()
    assert torch.isfinite(attr.scalars["image_prior_loss"]).all()
    assert (attr.scalars["image_prior_shift"] > 1e-4).all()  # the fit moved each pair's prior mask
    with pytest.raises(ValueError, match="prior_fit"):
        PriorFit(fit="gan")
