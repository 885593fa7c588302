"""IBA-style feature statistics: the Welford estimate, batch invariance, save / load, bad files, use in M2IB."""

import pytest
import torch

import clipib
from clipib.attribution.feature_stats import FeatureStats, Welford, estimate


def test_welford_equals_two_pass():
    gen = torch.Generator().manual_seed(0)
    rows = torch.randn(1000, 5, generator=gen, dtype=torch.float64) * torch.tensor([1e-3, 1, 10, 100, 1e4]) + 1e3
    w = Welford(5)
    for chunk in rows.split([1, 7, 300, 692]):
        w.update(chunk)
    assert w.n == 1000
    torch.testing.assert_close(w.mean, rows.mean(0), rtol=1e-12, atol=0)
    torch.testing.assert_close(w.std, rows.std(0), rtol=1e-10, atol=0)  # unbiased (n − 1), as IBA's


def test_estimate_equals_a_direct_computation(tiny_clip, pairs):
    images, ids = pairs
    stats = estimate(tiny_clip, [(images[:1], ids[:1]), (images[1:], ids[1:])], layer=2)
    with torch.no_grad():
        h_img = tiny_clip.image.prefix(images, 2).flatten(0, 1)  # every token
        h_txt = tiny_clip.text.prefix(ids, 2)
    valid = tiny_clip.text.span_mask(ids)[:, : h_txt.shape[1]]
    h_txt = h_txt[valid]  # SOT..EOT only
    for m, h in (("image", h_img), ("text", h_txt)):
        st = stats.towers[m]
        assert (st.layer, st.count, st.samples) == (2, h.shape[0], 4)
        torch.testing.assert_close(st.mean, h.mean(0), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(st.std, h.std(0), rtol=1e-5, atol=1e-6)
    # batching does not matter; eval-style dict batches and single-modality tensors work the same
    other = estimate(tiny_clip, [{"image": images, "ids": ids}], layer=2)
    image_only = estimate(tiny_clip, [images[:3], images[3:]], layer=2, modality="image")
    for a in (other, image_only):
        torch.testing.assert_close(a.towers["image"].mean, stats.towers["image"].mean, rtol=1e-6, atol=1e-7)
    assert set(image_only.towers) == {"image"}


def test_max_samples_and_default_layer(tiny_clip, pairs):
    images, ids = pairs
    stats = estimate(tiny_clip, [(images, ids)] * 3, max_samples=6)
    assert stats.towers["image"].samples == 6 and stats.towers["text"].samples == 6
    layer = clipib.M2IB(tiny_clip).layer_for(tiny_clip.image)
    assert stats.towers["image"].layer == layer
    with pytest.raises(ValueError, match="no text"):
        estimate(tiny_clip, [images], modality="both")
    with pytest.raises(ValueError):
        estimate(tiny_clip, [images], layer=9, modality="image")


def test_save_load_round_trip_and_use(tiny_clip, pairs, tmp_path):
    images, ids = pairs
    stats = estimate(tiny_clip, [(images, ids)])
    path = stats.save(tmp_path / "stats.safetensors")
    back = FeatureStats.load(path)
    assert set(back.towers) == {"image", "text"}
    for m in ("image", "text"):
        a, b = stats.towers[m], back.towers[m]
        assert (a.layer, a.count, a.samples) == (b.layer, b.count, b.samples)
        assert torch.equal(a.mean, b.mean) and torch.equal(a.std, b.std)
    by_path = clipib.M2IB(tiny_clip, feature_stats=str(path)).attribute(images[:2], ids[:2], seeds=[1, 2])
    by_obj = clipib.M2IB(tiny_clip, feature_stats=stats).attribute(images[:2], ids[:2], seeds=[1, 2])
    plain = clipib.M2IB(tiny_clip).attribute(images[:2], ids[:2], seeds=[1, 2])
    assert torch.equal(by_path.image_grid, by_obj.image_grid) and torch.equal(by_path.text_raw, by_obj.text_raw)
    assert torch.isfinite(by_path.image_grid).all() and torch.isfinite(by_path.text_raw).all()
    assert not torch.allclose(by_path.image_grid, plain.image_grid, rtol=1e-2)


def test_bad_files_and_mismatches(tiny_clip, pairs, tmp_path):
    images, ids = pairs
    with pytest.raises(FileNotFoundError, match="no such file"):
        clipib.M2IB(tiny_clip, feature_stats=tmp_path / "missing.safetensors")
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"not a safetensors file at all")
    with pytest.raises(ValueError, match="not a safetensors file"):
        FeatureStats.load(junk)
    from safetensors.torch import save_file

    foreign = tmp_path / "foreign.safetensors"
    save_file({"x": torch.zeros(2)}, str(foreign))
    with pytest.raises(ValueError, match="not a clipib feature-statistics file"):
        FeatureStats.load(foreign)
    image_only = estimate(tiny_clip, [images], modality="image")
    with pytest.raises(ValueError, match="not 'text'"):
        clipib.M2IB(tiny_clip, feature_stats=image_only).attribute(images[:1], ids[:1], "text")
    with pytest.raises(ValueError, match="layer 1"):
        clipib.M2IB(tiny_clip, feature_stats=estimate(tiny_clip, [images], layer=1, modality="image")).attribute(
            images[:1], ids[:1], "image")
    with pytest.raises(TypeError):
        clipib.M2IB(tiny_clip, feature_stats=3)
