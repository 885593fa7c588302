"""Grad-CAM, Chefer, FastIG, MFABA, random: one property of each method's paper, on the tiny model."""

import copy
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from captum.attr import IntegratedGradients

import clipib
from clipib.attribution.common import normalisation
from clipib.attribution.baselines.chefer import Chefer
from clipib.attribution.baselines.fast_ig import fast_ig
from clipib.attribution.baselines.mfaba import StepRule, mfaba

TINY = str(Path(__file__).parent / "data" / "tiny-clip.json")


@pytest.fixture(scope="module")
def clip64(tiny_clip):
    """The tiny model in float64, for finite differences and first-order checks."""
    return copy.deepcopy(tiny_clip).double()


@pytest.fixture(scope="module")
def box_images(tiny_clip):
    """Two preprocessed images whose raw pixels lie inside [0.1, 0.9] (inside MFABA's pixel box)."""
    mean, std = normalisation(tiny_clip, torch.empty(0))
    raw = 0.1 + 0.8 * torch.rand(2, 3, *tiny_clip.image_size, generator=torch.Generator().manual_seed(2))
    return (raw - mean) / std


def test_grad_cam_is_non_negative(tiny_clip, pairs):
    images, ids = pairs
    attr = clipib.METHODS["grad_cam"](tiny_clip).attribute(images, ids)
    for raw in (attr.image_grid, attr.text_raw):
        assert (raw >= 0).all() and (raw > 0).any()
    assert (attr.image_grid == 0).any()  # the ReLU cut negative evidence
    # the output of the last block: only CLS is pooled, so the patch tokens carry no gradient
    last = clipib.METHODS["grad_cam"](tiny_clip, layer=tiny_clip.image.n_layers).attribute(images, ids, "image")
    assert (last.image_grid == 0).all()


def _attention_fd(tower, x, target, row, eps=1e-6):
    """``mean_heads((A ⊙ ∂logit/∂A)⁺)[row]`` of the last block, the gradient by central differences."""
    last = tower.n_layers - 1
    with torch.no_grad():
        h = tower.prefix(x, last)
        seen = {}
        tower.suffix(h, last, x, attn_hook=lambda i, a: seen.setdefault("A", a))
        attn = seen["A"][0]  # [heads, T, T]
        heads, t = attn.shape[0], attn.shape[-1]
        cam = torch.zeros(heads, t, dtype=attn.dtype)
        for head in range(heads):
            for key in range(t):
                logits = []
                for sign in (1, -1):
                    bump = torch.zeros_like(attn)
                    bump[head, row, key] = sign * eps
                    emb = tower.suffix(h, last, x, attn_hook=lambda i, a: a + bump)
                    logits.append(100 * (emb * target).sum())
                cam[head, key] = attn[head, row, key] * (logits[0] - logits[1]) / (2 * eps)
    return cam.clamp(min=0).mean(0)  # [T]


def test_chefer_last_block_matches_finite_differences(clip64, pairs):
    """Chefer's last-block relevance is the clamped gradient × attention of the logit, read at CLS / EOT."""
    images, ids = pairs
    x_img, x_txt = images[1:2].double(), ids[1:2]
    e_img, e_txt = clip64.image.encode(x_img), clip64.text.encode(x_txt)
    method = Chefer(clip64, text_ends="keep")
    got_img = method.image_scores(x_img, x_txt, e_txt, [])[0].flatten()
    want_img = _attention_fd(clip64.image, x_img, e_txt, row=0)[1:]
    torch.testing.assert_close(got_img, want_img, rtol=1e-5, atol=1e-7)
    eot = int(clip64.text.eot_positions(x_txt)[0])
    got_txt = method.text_scores(x_img, x_txt, e_img, [])[0][0]
    want_txt = _attention_fd(clip64.text, x_txt, e_img, row=eot)
    torch.testing.assert_close(got_txt, want_txt, rtol=1e-5, atol=1e-7)
    assert (got_img > 0).any() and (got_txt > 0).any()


def test_chefer_all_blocks_dominate_last(tiny_clip, pairs):
    """R_all = (I + cam_L)·Π(I + cam_b) ≥ I + cam_L entrywise, as every cam is non-negative."""
    images, ids = pairs
    last = clipib.METHODS["chefer"](tiny_clip).attribute(images, ids)
    every = clipib.METHODS["chefer"](tiny_clip, blocks="all").attribute(images, ids)
    assert (last.image_grid >= 0).all() and (last.text_raw >= 0).all()
    assert (every.image_grid >= last.image_grid - 1e-5).all() and (every.text_raw >= last.text_raw - 1e-5).all()
    assert (every.image_grid > last.image_grid + 1e-3).any()
    eot = tiny_clip.text.eot_positions(ids)
    assert (last.text_raw[:, 0] == 0).all() and (last.text_raw[torch.arange(4), eot] == 0).all()  # "drop"


def test_fast_ig_equals_input_times_gradient(tiny_clip, pairs):
    """Against open_clip's own encoders, with the gradient taken by plain autograd."""
    images, ids = pairs
    attr = clipib.METHODS["fast_ig"](tiny_clip).attribute(images[:2], ids[:2])
    model = tiny_clip.model
    with torch.no_grad():
        e_img = F.normalize(model.encode_image(images[:2]), dim=-1)
        e_txt = F.normalize(model.encode_text(ids[:2]), dim=-1)
    x = images[:2].clone().requires_grad_(True)
    (g,) = torch.autograd.grad((F.normalize(model.encode_image(x), dim=-1) * e_txt).sum(), x)
    pixels = (x * g).sum(1)  # [2, H, W]
    torch.testing.assert_close(attr.image_grid, F.adaptive_avg_pool2d(pixels[:, None], tiny_clip.grid)[:, 0])
    leaf = {}

    def as_leaf(module, inputs, out):
        leaf["emb"] = out.detach().requires_grad_(True)
        return leaf["emb"]

    handle = model.token_embedding.register_forward_hook(as_leaf)
    try:
        cos = (F.normalize(model.encode_text(ids[:2]), dim=-1) * e_img).sum()
        (g,) = torch.autograd.grad(cos, leaf["emb"])
    finally:
        handle.remove()
    tokens = (leaf["emb"] * g).sum(-1).masked_fill(~tiny_clip.text.span_mask(ids[:2]), 0)  # [2, ctx]
    torch.testing.assert_close(attr.text_raw, tokens, rtol=1e-4, atol=1e-7)


def test_fast_ig_is_ig_for_homogeneous_models():
    """A bias-free ReLU net is positively homogeneous: FastIG = IG from zero; with biases it is not."""
    torch.manual_seed(0)
    x = torch.randn(3, 6, dtype=torch.float64)
    w1, w2, b1 = torch.randn(8, 6, dtype=x.dtype), torch.randn(8, dtype=x.dtype), torch.randn(8, dtype=x.dtype)
    homogeneous = lambda z: torch.relu(z @ w1.T) @ w2  # noqa: E731
    affine = lambda z: torch.relu(z @ w1.T + b1) @ w2  # noqa: E731
    for f, equal in ((homogeneous, True), (affine, False)):
        # right Riemann sum: the gradient is constant on the open ray (0, 1]·x (ReLU'(0) = 0 at α = 0)
        ig = IntegratedGradients(f).attribute(x, baselines=0.0, n_steps=64, method="riemann_right")
        assert torch.allclose(fast_ig(f, x), ig, atol=1e-10) == equal


def test_mfaba_sum_rule_on_linear_function():
    """Σ ∇f(x_t)·(x_t − x_{t+1}) = f(x_0) − f(x_T) exactly for linear f, whatever the path."""
    torch.manual_seed(0)
    w, x = torch.randn(5, dtype=torch.float64), torch.rand(4, 5, dtype=torch.float64)
    for rule in (StepRule("smooth", 0.05, 0.2, low=0.0, high=1.0), StepRule("sharp", 0.01)):
        path = mfaba(lambda z: z @ w, x, rule, steps=30)
        torch.testing.assert_close(path.attribution.sum(1), path.start - path.end, rtol=0, atol=1e-12)
        assert (path.start > path.end).all()  # the path lowers the score
    stop = float((x @ w).min()) - 0.1  # every row can reach it within 30 smooth steps of 0.05
    path = mfaba(lambda z: z @ w, x, StepRule("smooth", 0.05, None), steps=30, stop_at=stop)
    torch.testing.assert_close(path.attribution.sum(1), path.start - path.end, rtol=0, atol=1e-12)
    assert (path.end <= stop).all() and (path.end > stop - 0.05 * w.abs().sum()).all()  # stopped at the crossing


@pytest.mark.parametrize("variant, alpha", [("smooth", 0.001), ("sharp", 0.0001)])
def test_mfaba_sum_rule_on_clip(clip64, pairs, box_images, variant, alpha):
    """On the model the sum rule holds to first order: the gap is a small fraction of the score drop."""
    images, ids = pairs
    method = clipib.METHODS["mfaba"](clip64, variant=variant, steps=20, alpha=alpha)
    attr = method.attribute(box_images.double(), ids[:2])
    drop_img = attr.scalars["image_start"] - attr.scalars["image_end"]
    drop_txt = attr.scalars["text_start"] - attr.scalars["text_end"]
    h, w = clip64.image_size
    cell = h * w / (clip64.grid[0] * clip64.grid[1])
    total_img = attr.image_grid.sum((1, 2)) * cell  # the grid averages the pixel scores
    total_txt = attr.text_raw.sum(1)
    assert (drop_img > 0).all() and (drop_txt > 0).all()
    assert ((total_img - drop_img).abs() <= 0.05 * drop_img).all(), (total_img, drop_img)
    assert ((total_txt - drop_txt).abs() <= 0.05 * drop_txt).all(), (total_txt, drop_txt)


def test_random_ignores_model_and_inputs(tiny_clip, pairs):
    torch.manual_seed(5)
    other = clipib.load_clip(TINY, pretrained=None)
    images, ids = pairs
    a = clipib.METHODS["random"](tiny_clip).attribute(images[:2], ids[:2], seeds=[3, 4])
    b = clipib.METHODS["random"](other).attribute(-images[2:], ids[2:], seeds=[3, 4])
    c = clipib.METHODS["random"](other).attribute(-images[2:], ids[2:], seeds=[4, 3])
    torch.testing.assert_close(a.image_grid, b.image_grid, rtol=0, atol=0)
    valid = tiny_clip.text.span_mask(ids[:2]) & tiny_clip.text.span_mask(ids[2:])
    torch.testing.assert_close(a.text_raw[valid], b.text_raw[valid], rtol=0, atol=0)
    assert not torch.equal(a.image_grid, c.image_grid)
    assert (a.image_grid >= 0).all() and (a.image_grid < 1).all()
