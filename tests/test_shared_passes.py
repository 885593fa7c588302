"""Issue 20: clean passes and prefixes shared within a batch (PassCache) leave every result unchanged."""

import contextlib

import pytest
import torch

import clipib
from clipib.attribution import Attributor
from clipib.models.passes import PassCache, active_cache

SEEDS = [5, 6, 7, 8]
FAST = dict(steps=3, copies=3)


def _methods(clip):
    """Several methods, three of them cutting at the same layer (2) of both towers, one at the default."""
    return {"m2ib": clipib.M2IB(clip, layer=2, **FAST), "adaib": clipib.AdaIB(clip, layer=2, **FAST),
            "nib": clipib.NIB(clip, layer=2), "m2ib_default": clipib.M2IB(clip, **FAST),
            "adaib_mlp": clipib.AdaIB(clip, layer=2, compression="mlp", mlp_warmup=2, **FAST),
            "saliency": clipib.METHODS["saliency"](clip), "grad_cam": clipib.METHODS["grad_cam"](clip)}


def _same(a: clipib.Attribution, b: clipib.Attribution, name: str) -> None:
    for field in ("image", "image_grid", "text", "text_raw"):
        x, y = getattr(a, field), getattr(b, field)
        assert (x is None) == (y is None), (name, field)
        if x is not None:
            assert torch.equal(x, y), (name, field, float((x - y).abs().max()))
    assert a.scalars.keys() == b.scalars.keys(), name
    for key in a.scalars:
        assert torch.equal(a.scalars[key], b.scalars[key]), (name, key)


def test_pass_cache_same_maps_and_scalars(tiny_clip, pairs, monkeypatch):
    """Each method's maps and scalars are bit-identical without sharing, sharing within its own call (the
    default: the clean encode yields its prefix) and sharing across methods (an eval batch); the sharing
    happened."""
    images, ids = pairs
    with monkeypatch.context() as m:
        m.setattr(Attributor, "pass_cache", lambda self: contextlib.nullcontext())
        alone = {n: m.attribute(images, ids, seeds=SEEDS) for n, m in _methods(tiny_clip).items()}
    own = {n: m.attribute(images, ids, seeds=SEEDS) for n, m in _methods(tiny_clip).items()}
    cache = PassCache({tiny_clip.image: {2}, tiny_clip.text: {2}})
    with cache:
        assert active_cache() is cache
        with torch.no_grad():
            e_img, e_txt = tiny_clip.image.encode(images), tiny_clip.text.encode(ids)
        shared = {n: m.attribute(images, ids, seeds=SEEDS) for n, m in _methods(tiny_clip).items()}
        assert len(cache) >= 2
    for name in alone:
        _same(shared[name], alone[name], name)
        _same(own[name], alone[name], name)
    with torch.no_grad():
        assert torch.equal(e_img, tiny_clip.image.encode(images)) and torch.equal(e_txt, tiny_clip.text.encode(ids))
    enc_hits, enc_misses = cache.stats["encode"]
    pre_hits, pre_misses = cache.stats["prefix"]
    assert enc_misses == 2 and enc_hits >= 2 * 7 - 1  # one clean pass per tower; every method (and AdaIB's f) hits
    # every cut is at layer 2 (the default scales to 2 of these 3 blocks too), stored by the clean pass: each
    # bottleneck / integration prefix (5 layered methods x 2 towers, and Grad-CAM's at its layer) is read, none
    # recomputed
    assert tiny_clip.image.n_layers == 3 and clipib.M2IB(tiny_clip).layer_for(tiny_clip.image) == 2
    assert pre_hits >= 10 and pre_misses == 0
    assert active_cache() is None and len(cache) == 0  # nothing outlives the batch


def test_pass_cache_bypass_and_invalidation(tiny_clip, pairs):
    """Not shared: a different tensor with equal values, an input modified in place, grads to the input."""
    images, ids = pairs
    with torch.no_grad():
        ref = tiny_clip.image.prefix(images, 1)
    with PassCache() as cache, torch.no_grad():
        a = tiny_clip.image.prefix(images, 1)
        assert tiny_clip.image.prefix(images, 1) is a
        assert tiny_clip.image.prefix(images.clone(), 1) is not a  # equal values, another tensor: recomputed
        x = images.clone()
        first = tiny_clip.image.encode(x)
        x.mul_(2)  # in place: the stored pass is stale
        second = tiny_clip.image.encode(x)
        assert not torch.equal(first, second)
        a.add_(1)  # a stored output modified in place is recomputed
        assert torch.equal(tiny_clip.image.prefix(images, 1), ref)
    torch.testing.assert_close(a - 1, ref)  # the caller still owns what it modified
    x = images.clone().requires_grad_(True)
    with PassCache() as cache:
        emb = tiny_clip.image.encode(x)
        (g,) = torch.autograd.grad(emb.sum(), x)  # a graph to the input: computed, never stored
        assert g.abs().sum() > 0 and cache.stats["encode"] == [0, 0]
    with torch.autocast("cpu", dtype=torch.bfloat16), PassCache() as cache, torch.no_grad():
        low = tiny_clip.image.prefix(images, 1)
    assert low.dtype == torch.bfloat16 or not torch.equal(low, ref)


def test_pass_cache_one_per_batch(tiny_clip):
    cache = PassCache()
    with cache:
        with pytest.raises(RuntimeError, match="already active"):
            cache.__enter__()


def test_attribute_reads_its_prefix_off_the_clean_pass(tiny_clip, pairs):
    """One ``attribute`` call: block 0 of the attributed tower runs once (the clean encode), not twice."""
    images, ids = pairs
    calls = []
    handle = tiny_clip.image.blocks[0].register_forward_hook(lambda *a: calls.append(1))
    try:
        clipib.NIB(tiny_clip).attribute(images, ids, modality="image")
        assert len(calls) == 1
        clipib.M2IB(tiny_clip, precision="bf16", steps=1, copies=1).attribute(images, ids, modality="image")
        assert len(calls) == 3  # bf16: the fp32 clean pass is not reused for the autocast prefix
    finally:
        handle.remove()
