"""The model-side metric helpers on the tiny random-weight SplitCLIP, checked against open_clip's own
``encode_image`` / ``encode_text`` (which pools at the argmax of the ids: for a stripped caption that *is*
Hugging Face's legacy rule), so the protocols are verified independently of clipib's towers."""
import pytest
import torch
import torch.nn.functional as F

import clipib
from clipib.metrics import (
    Confidence,
    InsertionDeletion,
    Localization,
    confidence_drop,
    duplicate_product_factors,
    image_confidence_scores,
    image_insertion_deletion,
    image_scorer,
    median_mask,
    strip_special,
    text_confidence_scores,
    text_insertion_deletion,
    text_scorer,
)


def _cos(a, b):
    return F.cosine_similarity(a, b, dim=-1)


@pytest.fixture(scope="module")
def setup(tiny_clip, pairs):
    images, ids = pairs
    g = torch.Generator().manual_seed(5)
    maps = torch.rand(images.shape[0], *images.shape[-2:], generator=g)
    eot = tiny_clip.text.eot_positions(ids)
    pos = torch.arange(ids.shape[1])[None]
    scores = torch.where((pos <= eot[:, None]), torch.rand(ids.shape, generator=g), torch.zeros(ids.shape))
    model = tiny_clip.model
    with torch.no_grad():
        img_emb = model.encode_image(images, normalize=True)
        txt_emb = model.encode_text(ids, normalize=True)
    return tiny_clip, model, images, ids, maps, scores, img_emb, txt_emb


@pytest.mark.parametrize("protocol", ["corrected", "m2ib", "nib"])
def test_image_protocols_match_open_clip(setup, protocol):
    clip, model, images, ids, maps, _, img_emb, txt_emb = setup
    orig, pert = image_confidence_scores(clip, images, maps, ids, protocol)
    m = maps[:, None, :1, :] if protocol == "m2ib" else maps[:, None]
    with torch.no_grad():
        ref = _cos(model.encode_image(images * m, normalize=True), txt_emb)
    assert torch.allclose(orig, _cos(img_emb, txt_emb), atol=1e-5)
    assert torch.allclose(pert, ref, atol=1e-5)


def test_text_corrected_matches_open_clip(setup):
    clip, model, images, ids, _, scores, img_emb, txt_emb = setup
    orig, pert = text_confidence_scores(clip, images, ids, scores, "corrected")
    masked = median_mask(ids, scores, (ids > 0) & (ids < 49406), 0)  # content tokens of these captions
    assert (masked != ids).any()
    with torch.no_grad():
        ref = _cos(model.encode_text(masked, normalize=True), img_emb)
    assert torch.allclose(orig, _cos(txt_emb, img_emb), atol=1e-5)
    assert torch.allclose(pert, ref, atol=1e-5)


def test_text_m2ib_matches_open_clip_on_stripped_ids(setup):
    clip, model, images, ids, _, scores, img_emb, _ = setup
    orig, pert = text_confidence_scores(clip, images, ids, scores, "m2ib")
    s_ids, s_scores, valid = strip_special(ids, scores)
    assert (s_ids == 49407).sum() == 0 and (s_ids == 49406).sum() == 0
    p_ids = median_mask(s_ids, s_scores, valid, 0)
    with torch.no_grad():
        ref_o = _cos(model.encode_text(s_ids, normalize=True), img_emb)
        ref_p = _cos(model.encode_text(p_ids, normalize=True), img_emb)
    assert torch.allclose(orig, ref_o, atol=1e-5) and torch.allclose(pert, ref_p, atol=1e-5)


def test_text_nib_matches_open_clip_with_scaled_embedding_rows(setup):
    clip, model, images, ids, _, scores, img_emb, _ = setup
    ids = ids.clone()
    ids[0, 2] = ids[0, 1]  # a duplicated token: its row is scaled by both scores
    orig, pert = text_confidence_scores(clip, images, ids, scores, "nib")
    s_ids, s_scores, valid = strip_special(ids, scores)
    factors = duplicate_product_factors(s_ids, s_scores, valid)  # [B, L]
    assert factors[0, 0] == factors[0, 1] == s_scores[0, 0] * s_scores[0, 1]
    handle = model.token_embedding.register_forward_hook(lambda mod, inp, out: out * factors[..., None])
    try:
        with torch.no_grad():
            ref = _cos(model.encode_text(s_ids, normalize=True), img_emb)
    finally:
        handle.remove()
    with torch.no_grad():
        ref_o = _cos(model.encode_text(s_ids, normalize=True), img_emb)
    assert torch.allclose(pert, ref, atol=1e-5) and torch.allclose(orig, ref_o, atol=1e-5)


def test_scorers_and_curve_endpoints(setup):
    clip, _, images, ids, maps, scores, img_emb, txt_emb = setup
    clean = _cos(img_emb, txt_emb)
    assert torch.allclose(image_scorer(clip, ids)(images), clean, atol=1e-5)
    assert torch.allclose(text_scorer(clip, images, ids)(ids), clean, atol=1e-5)
    mean, std = clip.normalization
    auc, _, curves = image_insertion_deletion(images, maps, image_scorer(clip, ids), "deletion", 2, "black", mean, std)
    assert torch.allclose(curves[:, 0].float(), clean, atol=1e-5) and curves.shape == (4, 3)
    _, _, curves = text_insertion_deletion(ids, scores, text_scorer(clip, images, ids), "insertion", steps=2)
    assert torch.allclose(curves[:, -1].float(), clean, atol=1e-5)


def test_insertion_deletion_metric_equals_kernels(setup):
    clip, _, images, ids, maps, scores, _, _ = setup
    metric = InsertionDeletion(steps=3, fill="mean", replacement_id=5)
    attr = clipib.Attribution(image=maps, text=scores)
    for sl in (slice(0, 3), slice(3, 4)):
        part = clipib.Attribution(image=maps[sl], text=scores[sl])
        for mod in ("image", "text"):
            metric.update(clip, {"image": images[sl], "ids": ids[sl]}, part, mod)
    out = metric.compute()
    for mode in ("insertion", "deletion"):
        img = image_insertion_deletion(images, attr.image, image_scorer(clip, ids), mode, 3, "mean")[0]
        txt = text_insertion_deletion(ids, attr.text, text_scorer(clip, images, ids), mode, 3, 5,
                                      clip.text.eot_positions(ids))[0]
        assert out[f"image_{mode}"]["mean"].item() == pytest.approx(img.mean().item(), abs=1e-6)
        assert out[f"text_{mode}"]["mean"].item() == pytest.approx(txt.mean().item(), abs=1e-6)
        assert out[f"text_{mode}"]["std"].item() == pytest.approx(txt.std().item(), abs=1e-6)


def test_attribution_output_feeds_the_metrics(tiny_clip, pairs):
    images, ids = pairs
    attr = clipib.METHODS["nib"](tiny_clip).attribute(images, ids, modality="both")
    batch = {"image": images, "ids": ids, "box": torch.tensor([[0.0, 0.0, 16.0, 16.0]]).repeat(4, 1)}
    conf = Confidence()
    text = conf.update(tiny_clip, batch, attr, "text")["text_drop"]
    image = conf.update(tiny_clip, batch, attr, "image")["image_drop"]
    assert torch.allclose(text, confidence_drop(*text_confidence_scores(tiny_clip, images, ids, attr.text)))
    assert torch.allclose(image, confidence_drop(*image_confidence_scores(tiny_clip, images, attr.image, ids)))
    loc = Localization()
    loc.update(tiny_clip, batch, attr, "image")
    out = conf.compute()
    assert out["text_drop"]["n"].item() == out["image_drop"]["n"].item() == 4
    assert 0.0 <= loc.compute()["iou"]["mean"].item() <= 1.0
