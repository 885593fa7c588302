"""Confidence Drop / Increase (M2IB eqs. 17-18) and the corrected / m2ib / nib protocols (REFERENCE_NOTES §6).

The model-side helpers are tested against a small fake implementing only the SplitCLIP contract they use
(``image.encode``, ``text.encode``, ``text.token_embeddings``, ``text.encode_embeddings``,
``text.eot_positions``); the fake records what it is fed, so the tests check the perturbed inputs and the
pooling positions themselves.
"""
import pytest
import torch
import torch.nn.functional as F

from clipib.attribution import Attribution
from clipib.metrics import (
    Confidence,
    SeedMeanStd,
    confidence_drop,
    confidence_increase,
    image_confidence_scores,
    median_mask,
    text_confidence_scores,
)

SOT, EOT, V, D, E, CTX = 49406, 49407, 49408, 6, 5, 12


class _Text:
    def __init__(self, g):
        self.table = torch.randn(V, D, generator=g)
        self.pos = torch.randn(CTX, D, generator=g)
        self.proj = torch.randn(D, E, generator=g)
        self.calls = []  # (tok_emb, pool_at)

    def token_embeddings(self, ids):
        return self.table[ids]

    def encode_embeddings(self, tok, pool_at, ids=None):
        self.calls.append((tok.clone(), pool_at.clone()))
        h = (tok + self.pos[: tok.shape[1]]).cumsum(1)  # causal: position p sees 0..p
        return F.normalize(h[torch.arange(tok.shape[0]), pool_at] @ self.proj, dim=-1)

    def eot_positions(self, ids):
        return ids.argmax(-1)

    def encode(self, ids):
        return self.encode_embeddings(self.token_embeddings(ids), self.eot_positions(ids))


class _Image:
    def __init__(self, g, hw):
        self.w = torch.randn(3 * hw * hw, E, generator=g)
        self.seen = []

    def encode(self, x):
        self.seen.append(x.clone())
        return F.normalize(x.flatten(1) @ self.w, dim=-1)


class FakeCLIP:
    def __init__(self, hw=4, seed=0):
        g = torch.Generator().manual_seed(seed)
        self.text, self.image = _Text(g), _Image(g, hw)


def _pad(rows):
    return torch.tensor([r + [0] * (CTX - len(r)) for r in rows])


def _cos_text(clip, ids, pool, img_emb, tok_scale=None):
    tok = clip.text.table[ids]
    if tok_scale is not None:
        tok = tok * tok_scale[..., None]
    h = (tok + clip.text.pos).cumsum(1)
    return F.cosine_similarity(h[torch.arange(ids.shape[0]), pool] @ clip.text.proj, img_emb, dim=-1)


def test_drop_increase_by_hand_and_modular():
    orig = torch.tensor([0.30, 0.20, 0.50, 0.10])
    pert = torch.tensor([0.10, 0.25, 0.50, -0.20])
    assert torch.allclose(confidence_drop(orig, pert), torch.tensor([20.0, 0.0, 0.0, 30.0]))
    assert confidence_increase(orig, pert).tolist() == [0.0, 100.0, 0.0, 0.0]  # equal is no increase
    agg = SeedMeanStd(["drop", "incr"])
    for sl in (slice(0, 3), slice(3, 4)):
        agg.add({"drop": confidence_drop(orig[sl], pert[sl]), "incr": confidence_increase(orig[sl], pert[sl])})
    out = agg.compute()
    assert out["drop"]["mean"].item() == pytest.approx(12.5) and out["incr"]["mean"].item() == pytest.approx(25.0)


@pytest.mark.parametrize("protocol", ["corrected", "m2ib", "nib"])
def test_metric_equals_kernels(protocol):
    clip = FakeCLIP()
    g = torch.Generator().manual_seed(5)
    images = torch.randn(3, 3, 4, 4, generator=g)
    ids = _pad([[SOT, 500, 40000, 300, EOT], [SOT, 700, 800, 700, EOT], [SOT, 320, EOT]])
    attr = Attribution(image=torch.rand(3, 4, 4, generator=g), text=torch.rand(3, CTX, generator=g))
    metric = Confidence(protocol=protocol, replacement_id=3)
    for sl in (slice(0, 2), slice(2, 3)):
        part = Attribution(image=attr.image[sl], text=attr.text[sl])
        for mod in ("image", "text"):
            metric.update(clip, {"image": images[sl], "ids": ids[sl]}, part, mod)
    out = metric.compute()
    for mod, (o, p) in [("image", image_confidence_scores(clip, images, attr.image, ids, protocol)),
                        ("text", text_confidence_scores(clip, images, ids, attr.text, protocol, 3))]:
        assert out[f"{mod}_drop"]["mean"].item() == pytest.approx(confidence_drop(o, p).mean().item())
        assert out[f"{mod}_incr"]["mean"].item() == pytest.approx(confidence_increase(o, p).mean().item())
        assert out[f"{mod}_drop"]["n"].item() == 3


def test_image_protocols():
    clip = FakeCLIP()
    g = torch.Generator().manual_seed(1)
    images = torch.randn(2, 3, 4, 4, generator=g)
    maps = torch.rand(2, 4, 4, generator=g)
    ids = _pad([[SOT, 320, EOT], [SOT, 500, 600, EOT]])
    for protocol, expected in [("corrected", images * maps[:, None]), ("nib", images * maps[:, None]),
                               ("m2ib", images * maps[:, 0][:, None, None, :])]:
        clip.image.seen.clear()
        orig, pert = image_confidence_scores(clip, images, maps, ids, protocol)
        assert torch.equal(clip.image.seen[0], images)
        assert torch.allclose(clip.image.seen[1], expected)
        t = clip.text.encode(ids)
        ref = F.cosine_similarity(F.normalize(expected.flatten(1) @ clip.image.w, dim=-1), t, dim=-1)
        assert torch.allclose(pert, ref, atol=1e-6)
    # the m2ib bug: row i of the perturbed image uses the map's row 0, not row i
    assert not torch.allclose(images * maps[:, None], images * maps[:, 0][:, None, None, :])


def test_text_corrected_keeps_sot_eot_and_pools_at_eot():
    clip = FakeCLIP()
    images = torch.randn(1, 3, 4, 4, generator=torch.Generator().manual_seed(2))
    ids = _pad([[SOT, 500, 40000, 300, 700, EOT]])
    scores = torch.zeros(1, CTX)
    scores[0, 1:5] = torch.tensor([0.9, 0.1, 0.5, 0.7])  # median 0.6 -> 40000 and 300 replaced
    orig, pert = text_confidence_scores(clip, images, ids, scores, "corrected", replacement_id=1)
    tok, pool = clip.text.calls[-1]
    expected = _pad([[SOT, 500, 1, 1, 700, EOT]])
    assert torch.equal(tok, clip.text.table[expected]) and pool.tolist() == [5]
    img = clip.image.encode(images)
    assert torch.allclose(pert, _cos_text(clip, expected, torch.tensor([5]), img), atol=1e-6)
    assert torch.allclose(orig, _cos_text(clip, ids, torch.tensor([5]), img), atol=1e-6)


def test_text_m2ib_strips_and_uses_legacy_pooling_that_masking_moves():
    clip = FakeCLIP()
    images = torch.randn(1, 3, 4, 4, generator=torch.Generator().manual_seed(3))
    ids = _pad([[SOT, 500, 40000, 300, EOT]])
    scores = torch.zeros(1, CTX)
    scores[0, :5] = torch.tensor([1.0, 0.9, 0.1, 0.5, 1.0])  # content median 0.5 -> 40000, 300 -> id 0
    clip.text.calls.clear()
    orig, pert = text_confidence_scores(clip, images, ids, scores, "m2ib", replacement_id=123)  # ignored
    (tok_o, pool_o), (tok_p, pool_p) = clip.text.calls
    stripped, masked = _pad([[500, 40000, 300]]), _pad([[500, 0, 0]])
    assert torch.equal(tok_o, clip.text.table[stripped]) and torch.equal(tok_p, clip.text.table[masked])
    # legacy rule: the largest id of the stripped sequence - 40000 at position 1, then 500 at position 0
    assert (pool_o.item(), pool_p.item()) == (1, 0)
    img = clip.image.encode(images)
    assert torch.allclose(orig, _cos_text(clip, stripped, pool_o, img), atol=1e-6)
    assert torch.allclose(pert, _cos_text(clip, masked, pool_p, img), atol=1e-6)
    # the corrected protocol on the same input pools at EOT (position 4) both times
    clip.text.calls.clear()
    text_confidence_scores(clip, images, ids, scores, "corrected")
    assert [c[1].item() for c in clip.text.calls] == [4, 4]


def test_text_nib_scales_rows_by_product_over_duplicates():
    clip = FakeCLIP()
    images = torch.randn(1, 3, 4, 4, generator=torch.Generator().manual_seed(4))
    ids = _pad([[SOT, 700, 800, 700, EOT]])
    scores = torch.zeros(1, CTX)
    scores[0, 1:4] = torch.tensor([0.5, 0.9, 0.4])
    clip.text.calls.clear()
    orig, pert = text_confidence_scores(clip, images, ids, scores, "nib")
    (tok_o, pool_o), (tok_p, pool_p) = clip.text.calls
    stripped = _pad([[700, 800, 700]])
    factors = torch.ones(1, CTX)
    factors[0, :3] = torch.tensor([0.5 * 0.4, 0.9, 0.5 * 0.4])  # id 700 twice: both rows x 0.2
    assert torch.equal(tok_o, clip.text.table[stripped])
    assert torch.allclose(tok_p, clip.text.table[stripped] * factors[..., None])
    assert pool_o.item() == pool_p.item() == 1  # largest id 800; ids unchanged, position unchanged
    img = clip.image.encode(images)
    assert torch.allclose(pert, _cos_text(clip, stripped, pool_p, img, factors), atol=1e-6)


def test_median_mask_batched_with_padding():
    ids = _pad([[SOT, 5, 6, 7, EOT], [SOT, 8, 9, EOT]])
    scores = torch.tensor([[9.0, 0.3, 0.2, 0.1, 9.0] + [9.0] * 7, [9.0, 0.2, 0.4, 9.0] + [9.0] * 8])
    valid = torch.zeros(2, CTX, dtype=torch.bool)
    valid[0, 1:4] = True
    valid[1, 1:3] = True
    out = median_mask(ids, scores, valid, 0)
    assert out[0, :5].tolist() == [SOT, 5, 0, 0, EOT]  # median 0.2: 0.2 and 0.1 replaced
    assert out[1, :4].tolist() == [SOT, 0, 9, EOT]  # median 0.3 (mean of the middle two)


def test_unknown_protocol():
    with pytest.raises(ValueError, match="protocol"):
        Confidence(protocol="hf")
    with pytest.raises(ValueError, match="protocol"):
        text_confidence_scores(FakeCLIP(), torch.zeros(1, 3, 4, 4), _pad([[SOT, EOT]]), torch.zeros(1, CTX), "hf")
