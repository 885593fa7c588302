"""M2IB: shapes, masking, batching, seeds, saturation, and agreement with the reference-shaped loop."""

import torch
from torchmetrics.functional import spearman_corrcoef

import clipib
from clipib.attribution.bottleneck import Bottleneck
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
