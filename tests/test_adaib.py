"""AdaIB: Proposition 1 (reduction to M2IB), every f and g option, the MLP rules (regressed, joint; Table 7),
raw or normalised embeddings, batching, the scalars (incl. the pre-clip gradient norms)."""

import pytest
import torch
from torchmetrics.functional import spearman_corrcoef

import clipib
from clipib.attribution.adaib import COMPRESSIONS, RELEVANCES, PairMLPs
from clipib.attribution.bottleneck import Bottleneck

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


@pytest.mark.parametrize("options", [
    dict(compression="mlp"),
    dict(compression="mlp_joint", mlp_hidden=[8, 8], embeddings="raw", relevance_from="bottleneck",
         record_grad_norm=True),
], ids=["mlp", "issue15_options"])
def test_batch_equals_single(tiny_clip, pairs, options):
    images, ids = pairs
    method = clipib.AdaIB(tiny_clip, **options, **FAST)
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


# --- issue #15: embeddings, the jointly trained g, Table 7's architectures, pre-clip gradient norms ------------

def test_raw_embeddings_measure_f_on_unnormalised_vectors(tiny_clip, pairs):
    """embeddings="raw": f is the distance between open_clip's un-normalised embeddings, so β_eff = g/f differs."""
    images, ids = pairs
    norm = clipib.AdaIB(tiny_clip, **FAST).attribute(images, ids)
    raw = clipib.AdaIB(tiny_clip, embeddings="raw", **FAST).attribute(images, ids)
    with torch.no_grad():  # open_clip's own forward, not SplitCLIP's
        e_img, e_txt = tiny_clip.model.encode_image(images), tiny_clip.model.encode_text(ids)
    assert not torch.allclose(e_img.norm(dim=-1), torch.ones(4), atol=1e-2)  # raw vectors carry a modulus
    for mod in ("image", "text"):
        expected_f = 1 / ((e_img - e_txt).norm(dim=-1) + 1e-3)
        torch.testing.assert_close(raw.scalars[f"{mod}_f"], expected_f, rtol=1e-5, atol=0)
        torch.testing.assert_close(raw.scalars[f"{mod}_beta"], raw.scalars[f"{mod}_g"] / raw.scalars[f"{mod}_f"])
        assert ((raw.scalars[f"{mod}_beta"] / norm.scalars[f"{mod}_beta"] - 1).abs() > 0.05).all()
    assert not torch.allclose(raw.image_grid, norm.image_grid)
    # the cosine relevance only sees directions: the same f either way
    cos = [clipib.AdaIB(tiny_clip, relevance="cosine", embeddings=e, **FAST).attribute(images[:2], ids[:2], "image")
           for e in ("normalized", "raw")]
    torch.testing.assert_close(cos[0].scalars["image_f"], cos[1].scalars["image_f"])


def test_raw_embeddings_from_the_bottleneck(tiny_clip, pairs):
    images, ids = pairs
    kw = dict(embeddings="raw", relevance_from="bottleneck", **FAST)
    clean = clipib.AdaIB(tiny_clip, embeddings="raw", **FAST).attribute(images[:2], ids[:2], "image")
    noisy = clipib.AdaIB(tiny_clip, **kw).attribute(images[:2], ids[:2], "image")
    normed = clipib.AdaIB(tiny_clip, relevance_from="bottleneck", **FAST).attribute(images[:2], ids[:2], "image")
    assert torch.isfinite(noisy.image_grid).all()
    assert ((noisy.scalars["image_f"] - clean.scalars["image_f"]).abs() > 1e-4).all()
    # raw distances are not bounded by 2: f on raw vectors is not the normalised f
    assert ((noisy.scalars["image_f"] - normed.scalars["image_f"]).abs() > 1e-3).all()


def test_bottleneck_raw_and_extra_params_chunked_equals_unchunked(tiny_clip, pairs):
    """The bottleneck's two new inputs (raw embeddings to the objective, per-pair extra parameters trained with α)
    give the same result through the chunked path."""
    images, ids = pairs
    target = tiny_clip.text.encode(ids[:2])
    results = []
    for chunk in (None, 3):
        w = torch.ones(2, requires_grad=True)  # one extra parameter per pair

        def objective(emb, tgt, kl, raw):
            scale = raw.norm(dim=-1).mean(1)  # reads the raw embeddings (detached)
            return w * kl * scale - (emb * tgt[:, None]).sum(-1).mean(1)

        gens = [torch.Generator().manual_seed(s) for s in (3, 4)]
        res = Bottleneck(steps=3, copies=2, clip_grad=1.0, internal_batch_size=chunk).run(
            tiny_clip.image, images[:2], 2, target, gens, objective, extra_params=[w], raw=True)
        results.append((res, w.detach().clone()))
    (a, wa), (b, wb) = results
    assert not torch.allclose(wa, torch.ones(2))  # the extra parameter was trained
    torch.testing.assert_close(wa, wb, rtol=1e-5, atol=1e-6)
    for key in ("capacity", "kl", "fit", "loss", "grad_norm_mean", "grad_norm_max", "clipped"):
        torch.testing.assert_close(getattr(a, key), getattr(b, key), rtol=1e-4, atol=1e-6)


def test_mlp_joint_trains_g_on_the_bottleneck_loss(tiny_clip, pairs):
    """With two steps, the one update moves every φ by lr·sign(∂(g·KL)/∂φ) = lr·sign(∂g/∂φ) (Adam's first step,
    KL > 0): the reported g is the MLP's at those weights. A detached g (no update) or the regression would fail."""
    images, ids = pairs
    attr = clipib.AdaIB(tiny_clip, compression="mlp_joint", steps=2, copies=2).attribute(images[:2], ids[:2], "image")
    f, g = attr.scalars["image_f"], attr.scalars["image_g"]
    mlp = PairMLPs(2, 32, 1e-3, 0.05, 0, f)  # the same initialisation (mlp_seed 0)
    g0 = mlp(f)
    grads = torch.autograd.grad(g0.sum(), mlp.params)
    with torch.no_grad():
        for p, d in zip(mlp.params, grads):
            p -= 1.0 * torch.sign(d)  # lr 1
        g1 = mlp(f)
    torch.testing.assert_close(g, g1, rtol=1e-4, atol=1e-6)
    assert (g < 0.5 * g0.detach()).all()  # ∂loss/∂g = KL > 0: g is pushed down


def test_mlp_joint_collapses_towards_eps_g(tiny_clip, pairs):
    """The literal reading's documented behaviour: over 10 steps g falls towards ε_g, far below eq. 13."""
    images, ids = pairs
    joint = clipib.AdaIB(tiny_clip, compression="mlp_joint").attribute(images[:2], ids[:2], seeds=[1, 2])
    for mod in ("image", "text"):
        f, g = joint.scalars[f"{mod}_f"], joint.scalars[f"{mod}_g"]
        assert (g < 0.1 / (f + 1e-3)).all() and (g >= 1e-3).all(), (g, f)


@pytest.mark.parametrize("hidden,shapes", [
    ([], [(3, 1, 1), (3, 1)]),
    (32, [(3, 32, 1), (3, 32), (3, 1, 32), (3, 1)]),
    ([8, 8], [(3, 8, 1), (3, 8), (3, 8, 8), (3, 8), (3, 1, 8), (3, 1)]),
    ([64, 64], [(3, 64, 1), (3, 64), (3, 64, 64), (3, 64), (3, 1, 64), (3, 1)]),
])
@pytest.mark.parametrize("activation", ["relu", "tanh", "none"])
def test_table_7_architectures(hidden, shapes, activation):
    """Parameter shapes per layer, and g equals the same weights run through torch.nn layers."""
    f = torch.tensor([0.3, 1.0, 4.0])
    mlp = PairMLPs(3, hidden, 1e-3, 0.05, 0, f, activation)
    assert [tuple(p.shape) for p in mlp.params] == shapes
    act = {"relu": torch.nn.ReLU(), "tanh": torch.nn.Tanh(), "none": torch.nn.Identity()}[activation]
    layers = []
    for i in range(0, len(mlp.params), 2):
        lin = torch.nn.Linear(mlp.params[i].shape[2], mlp.params[i].shape[1])
        with torch.no_grad():
            lin.weight.copy_(mlp.params[i][0])
            lin.bias.copy_(mlp.params[i + 1][0])
        layers += [lin, act]
    net = torch.nn.Sequential(*layers[:-1])
    expected = 1e-3 + torch.nn.functional.softplus(net(f.log()[:, None])[:, 0])
    torch.testing.assert_close(mlp(f), expected, rtol=1e-5, atol=1e-6)
    if activation == "none" or hidden == []:  # affine in log f: equal second differences vanish
        x = torch.tensor([0.5, 1.0, 2.0])  # log-spaced: log f at -a, 0, a
        u = torch.log(torch.expm1(mlp(x) - 1e-3))  # softplus⁻¹
        torch.testing.assert_close(u[0] + u[2], 2 * u[1], rtol=0, atol=1e-4)


def test_architecture_options_change_g(tiny_clip, pairs):
    images, ids = pairs
    gs = [clipib.AdaIB(tiny_clip, compression="mlp_joint", mlp_hidden=h, mlp_activation=a, steps=2, copies=2)
          .attribute(images[:1], ids[:1], "image").scalars["image_g"] for h, a in ((32, "relu"), ([8, 8], "tanh"))]
    assert not torch.allclose(gs[0], gs[1])
    for bad in (dict(mlp_hidden=0), dict(mlp_hidden=[8, -1]), dict(mlp_hidden="32"), dict(mlp_activation="gelu"),
                dict(embeddings="unnormalised"), dict(compression="joint")):
        with pytest.raises(ValueError):
            clipib.AdaIB(tiny_clip, **bad)


def test_pre_clip_gradient_norms(tiny_clip, pairs):
    """record_grad_norm: the norm before clipping, and the fraction of updates the clip acted on."""
    images, ids = pairs
    kw = dict(record_grad_norm=True, **FAST)
    off = clipib.AdaIB(tiny_clip, clip_grad=None, **kw).attribute(images, ids)
    on = clipib.AdaIB(tiny_clip, clip_grad=1.0, **kw).attribute(images, ids)
    tight = clipib.AdaIB(tiny_clip, clip_grad=1e-6, **kw).attribute(images, ids)
    assert "image_grad_norm" not in clipib.AdaIB(tiny_clip, **FAST).attribute(images[:1], ids[:1]).scalars
    for mod in ("image", "text"):
        mean, top = off.scalars[f"{mod}_grad_norm"], off.scalars[f"{mod}_grad_norm_max"]
        assert (mean > 0).all() and (top >= mean).all()
        assert (off.scalars[f"{mod}_clipped"] == 0).all()
        assert (tight.scalars[f"{mod}_clipped"] == 1).all()  # every update clipped
        # the first update sees the same gradient whatever the clip: equal maxima where the norm is < 1
        small = on.scalars[f"{mod}_grad_norm_max"] < 1.0
        assert (on.scalars[f"{mod}_clipped"][small] == 0).all()
