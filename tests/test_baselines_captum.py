"""Saliency, Integrated Gradients, KernelSHAP, RISE: one property each paper states, on the tiny model."""

import copy

import pytest
import torch
from captum.attr import KernelShap as CaptumKernelShap
from captum._utils.models.linear_model import LinearModel

import clipib
from clipib.attribution.base import sample_generators
from clipib.attribution.common import PAD_ID, reference_image
from clipib.attribution.baselines.kernel_shap import fit_weighted_least_squares


@pytest.fixture(scope="module")
def clip64(tiny_clip):
    """The tiny model in float64, for finite differences and tight sums."""
    return copy.deepcopy(tiny_clip).double()


def _cos_image(clip, images, target):
    with torch.no_grad():
        return (clip.image.encode(images) * target).sum(-1)


def _cos_ids(clip, ids, target):
    with torch.no_grad():
        return (clip.text.encode(ids) * target).sum(-1)


def test_saliency_is_the_gradient_magnitude(clip64, pairs):
    """Simonyan Sec. 3.1: the map is |∂score/∂x| (max over channels) — checked by central differences."""
    images, ids = pairs[0][:1].double(), pairs[1][1:2]
    target_txt, target_img = clip64.text.encode(ids), clip64.image.encode(images)
    method = clipib.METHODS["saliency"](clip64)
    gens = sample_generators([0])
    pixel_map = method.image_scores(images, ids, target_txt, gens)[0][0]  # [H, W]
    eps = 1e-6
    for (y, x) in [(0, 0), (5, 17), (31, 30)]:
        fd = []
        for c in range(3):
            bump = torch.zeros_like(images)
            bump[0, c, y, x] = eps
            up, down = _cos_image(clip64, images + bump, target_txt), _cos_image(clip64, images - bump, target_txt)
            fd.append(abs(float(up - down)) / (2 * eps))
        assert abs(pixel_map[y, x].item() - max(fd)) < 1e-6 + 1e-5 * max(fd), (y, x, pixel_map[y, x].item(), fd)
    token_map = method.text_scores(images, ids, target_img, gens)[0][0]  # [L]
    text, t = clip64.text, 3
    pool_at, emb = text.eot_positions(ids), text.token_embeddings(ids[:, : text.valid_length(ids)])
    grad = torch.zeros(emb.shape[-1], dtype=emb.dtype)
    with torch.no_grad():
        for d in range(emb.shape[-1]):
            bump = torch.zeros_like(emb)
            bump[0, t, d] = eps
            up = (text.encode_embeddings(emb + bump, pool_at) * target_img).sum()
            down = (text.encode_embeddings(emb - bump, pool_at) * target_img).sum()
            grad[d] = (up - down) / (2 * eps)
    assert abs(token_map[t].item() - grad.norm().item()) < 1e-5 * grad.norm().item()
    assert (pixel_map >= 0).all() and (token_map >= 0).all()


def test_integrated_gradients_completeness(clip64, pairs):
    """Sundararajan Prop. 1: Σ attributions = F(x) − F(baseline), here to 1e-6 with 50 Gauss-Legendre points."""
    images, ids = pairs[0][:2].double(), pairs[1][:2]
    target_txt, target_img = clip64.text.encode(ids), clip64.image.encode(images)
    method = clipib.METHODS["integrated_gradients"](clip64, internal_batch_size=37)
    gens = sample_generators([0, 0])
    img, _ = method.image_scores(images, ids, target_txt, gens)  # [2, H, W]
    black = reference_image(clip64, images, "black")
    gap = _cos_image(clip64, images, target_txt) - _cos_image(clip64, black, target_txt)
    torch.testing.assert_close(img.sum((1, 2)), gap, atol=1e-6, rtol=1e-4)
    assert (img < 0).any() and (img > 0).any()  # signed

    tok, scalars = method.text_scores(images, ids, target_img, gens)  # [2, L]
    padded = ids.masked_fill(clip64.text.span_mask(ids, special=False), PAD_ID)  # SOT, pads…, EOT
    gap = _cos_ids(clip64, ids, target_img) - _cos_ids(clip64, padded, target_img)
    torch.testing.assert_close(tok.sum(1), gap, atol=1e-6, rtol=1e-4)
    assert (tok[:, 0] == 0).all()  # SOT is kept in the baseline, so it gets nothing
    assert scalars["text_delta"].abs().max() < 1e-6


def test_kernel_shap_efficiency(tiny_clip, pairs):
    """Lundberg & Lee (Property 1, local accuracy): Σ φ_i = f(x) − f(all players removed)."""
    images, ids = pairs[0][:2], pairs[1][:2]
    target_txt, target_img = tiny_clip.text.encode(ids), tiny_clip.image.encode(images)
    method = clipib.METHODS["kernel_shap"](tiny_clip, n_samples=40, internal_batch_size=16)
    attr = method.attribute(images, ids, seeds=[3, 4])
    mean_fill = reference_image(tiny_clip, images, "mean")
    gap = _cos_image(tiny_clip, images, target_txt) - _cos_image(tiny_clip, mean_fill, target_txt)
    torch.testing.assert_close(attr.image_grid.sum((1, 2)), gap, atol=1e-4, rtol=1e-3)
    padded = ids.masked_fill(tiny_clip.text.span_mask(ids, special=False), PAD_ID)
    gap = _cos_ids(tiny_clip, ids, target_img) - _cos_ids(tiny_clip, padded, target_img)
    torch.testing.assert_close(attr.text_raw.sum(1), gap, atol=1e-4, rtol=1e-3)
    assert attr.text_raw[torch.arange(2), tiny_clip.text.eot_positions(ids)].eq(0).all()  # EOT is not a player


def test_kernel_shap_recovers_a_linear_model():
    """Linear model: the Shapley values are w_i (x_i − x'_i); the exact WLS surrogate finds them."""
    gen = torch.Generator().manual_seed(0)
    w, x = torch.randn(6, generator=gen), torch.randn(1, 6, generator=gen)
    explainer = CaptumKernelShap(lambda v: v @ w + 0.5)
    explainer.interpretable_model = LinearModel(train_fn=fit_weighted_least_squares)
    phi = explainer.attribute(x, baselines=torch.zeros_like(x), n_samples=30, perturbations_per_eval=8)
    torch.testing.assert_close(phi[0], w * x[0], atol=1e-5, rtol=1e-4)


def test_rise_all_ones_masks_give_a_flat_map(tiny_clip, pairs):
    """Petsiuk eq. 6 with p = 1: every mask keeps everything, so S = score(x) everywhere (image and tokens)."""
    images, ids = pairs
    method = clipib.METHODS["rise"](tiny_clip, n_masks=12, text_masks=5, p=1.0, internal_batch_size=5)
    attr = method.attribute(images, ids)
    clean = tiny_clip.similarity(images, ids)  # [B]
    torch.testing.assert_close(attr.image_grid, clean[:, None, None].expand_as(attr.image_grid), atol=1e-5, rtol=1e-5)
    valid = attr.text_raw != 0
    assert valid.sum(1).eq(tiny_clip.text.eot_positions(ids) + 1).all()
    torch.testing.assert_close(attr.text_raw, torch.where(valid, clean[:, None], 0.0), atol=1e-5, rtol=1e-5)
    # p < 1: the map varies, and does not depend on how masks are chunked
    a = clipib.METHODS["rise"](tiny_clip, n_masks=40, text_masks=20, internal_batch_size=7).attribute(images, ids)
    b = clipib.METHODS["rise"](tiny_clip, n_masks=40, text_masks=20, internal_batch_size=40).attribute(images, ids)
    assert a.image_grid.flatten(1).std(1).gt(0).all()
    torch.testing.assert_close(a.image_grid, b.image_grid, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(a.text_raw, b.text_raw, atol=1e-5, rtol=1e-4)


def test_integrated_gradients_chunking_same_maps(clip64, pairs):
    """The default ``internal_batch_size`` (64 rows; Captum chunks by steps) gives the maps of one unchunked
    pass, and a chunk smaller than the batch is raised to one step of every pair instead of warning."""
    images, ids = pairs[0][:3].double(), pairs[1][:3]
    whole = clipib.METHODS["integrated_gradients"](clip64, steps=30, internal_batch_size=None)
    chunked = clipib.METHODS["integrated_gradients"](clip64, steps=30)  # 3 pairs x 30 steps > 64 rows
    tiny = clipib.METHODS["integrated_gradients"](clip64, steps=30, internal_batch_size=1)
    assert chunked.internal_batch_size == 64
    ref = whole.attribute(images, ids)
    for other in (chunked, tiny):
        got = other.attribute(images, ids)
        torch.testing.assert_close(got.image, ref.image, atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(got.text_raw, ref.text_raw, atol=1e-6, rtol=1e-5)
    with pytest.raises(ValueError, match="internal_batch_size"):
        clipib.METHODS["integrated_gradients"](clip64, internal_batch_size=0)
