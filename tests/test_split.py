"""SplitCLIP exactness: prefix + suffix == encode == open_clip's own encoders, for every cut."""

import pytest
import safetensors.torch
import torch
import torch.nn.functional as F

import clipib
from clipib.models.split import UnsupportedModelError


def _reference(clip, images, ids):
    m = clip.model
    return F.normalize(m.encode_image(images), dim=-1), F.normalize(m.encode_text(ids), dim=-1)


def _check_all_cuts(clip, images, ids, ks=None):
    ref_img, ref_txt = _reference(clip, images, ids)
    for tower, x, ref in ((clip.image, images, ref_img), (clip.text, ids, ref_txt)):
        torch.testing.assert_close(tower.encode(x), ref, atol=1e-5, rtol=0)
        for k in ks or range(tower.n_layers + 1):
            h = tower.prefix(x, k)
            assert h.ndim == 3 and h.shape[0] == x.shape[0]
            torch.testing.assert_close(tower.suffix(h, k, x), ref, atol=1e-5, rtol=0)


def test_tiny_every_cut(tiny_clip, pairs):
    images, ids = pairs
    _check_all_cuts(tiny_clip, images, ids)
    # text runs on the longest SOT..EOT only
    assert tiny_clip.text.prefix(ids, 1).shape[1] == int(tiny_clip.text.eot_positions(ids).max()) + 1


@torch.no_grad()
def test_vit_b32_every_cut():
    torch.manual_seed(0)
    clip = clipib.load_clip("ViT-B-32-quickgelu", pretrained=None)
    assert clip.grid == (7, 7) and clip.image.n_layers == 12 and clip.text.n_layers == 12
    images = torch.randn(1, 3, 224, 224).expand(2, -1, -1, -1)  # batch of 2, one image's compute per cut
    ids = clip.tokenize(["a dog", "a photograph of two cats sleeping on a red sofa in the sun"])
    _check_all_cuts(clip, images, ids)


@torch.no_grad()
def test_vit_b16_grid_from_model():
    torch.manual_seed(0)
    clip = clipib.load_clip("ViT-B-16", pretrained=None)
    assert clip.grid == (14, 14)
    _check_all_cuts(clip, torch.randn(1, 3, 224, 224), clip.tokenize(["a cat"]), ks=[0, 6, 12])


def test_attention_hook_path_is_exact(tiny_clip, pairs):
    images, ids = pairs
    seen = []

    def hook(i, attn):
        seen.append((i, attn.shape))
        torch.testing.assert_close(attn.sum(-1), torch.ones_like(attn.sum(-1)))
        return attn

    for tower, x in ((tiny_clip.image, images), (tiny_clip.text, ids)):
        ref = tower.encode(x)
        torch.testing.assert_close(tower.suffix(tower.prefix(x, 1), 1, x, attn_hook=hook), ref, atol=1e-5, rtol=0)
    assert [i for i, _ in seen] == [1, 2, 1, 2]


def test_encode_embeddings_matches_encode(tiny_clip, pairs):
    _, ids = pairs
    text = tiny_clip.text
    out = text.encode_embeddings(text.token_embeddings(ids), text.eot_positions(ids))
    torch.testing.assert_close(out, text.encode(ids), atol=1e-5, rtol=0)


def test_frozen_eval(tiny_clip):
    assert not any(p.requires_grad for p in tiny_clip.parameters())
    tiny_clip.train()
    assert not tiny_clip.model.training


def test_local_checkpoints(tmp_path, tiny_clip, tiny_config, pairs):
    images, ids = pairs

    state = tiny_clip.model.state_dict()
    st = tmp_path / "w.safetensors"
    safetensors.torch.save_file({k: v.contiguous() for k, v in state.items()}, str(st))
    pt = tmp_path / "w.pt"
    torch.save(state, pt)
    for path in (st, pt):
        clip = clipib.load_clip(tiny_config, pretrained=str(path))
        torch.testing.assert_close(clip.similarity(images, ids), tiny_clip.similarity(images, ids))
    # a pickle that is not a plain state dict is refused, never executed
    evil = tmp_path / "evil.pt"
    torch.save({"state_dict": {"x": object()}}, evil)
    with pytest.raises(clipib.ModelLoadError):
        clipib.load_clip(tiny_config, pretrained=str(evil))


def test_bad_models():
    with pytest.raises(clipib.ModelLoadError, match="unknown model"):
        clipib.load_clip("no-such-model", pretrained=None)
    with pytest.raises(clipib.ModelLoadError, match="neither a file nor a known"):
        clipib.load_clip("ViT-B-32-quickgelu", pretrained="no-such-tag")
    with pytest.raises(UnsupportedModelError):
        clipib.load_clip("RN50", pretrained=None)


def test_offline_tag_is_one_clear_error(monkeypatch):
    import clipib.models.loading as loading

    monkeypatch.setattr(loading, "_hub_reachable", lambda *a, **k: False)
    with pytest.raises(clipib.ModelLoadError, match="--pretrained PATH"):
        clipib.load_clip("ViT-B-32-quickgelu", pretrained="openai")


def test_truncation_warns(tiny_clip):
    with pytest.warns(UserWarning, match="truncated"):
        ids = tiny_clip.tokenize(["word " * 100])
    assert int(tiny_clip.text.eot_positions(ids)[0]) == tiny_clip.context_length - 1


def test_loading_keeps_other_loggers(tiny_config, caplog):
    """Loading silences open_clip's own records only: the process's other loggers keep logging meanwhile."""
    import logging

    from clipib.models import loading

    caplog.set_level(logging.INFO)
    with loading._quiet(offline=True):
        logging.getLogger("my_experiment").warning("still heard")
        logging.info("root records of the user's code too")
    assert [r.getMessage() for r in caplog.records] == ["still heard", "root records of the user's code too"]
    assert logging.root.manager.disable == logging.NOTSET
    clipib.load_clip(tiny_config, pretrained=None)
    logging.getLogger("my_experiment").warning("after")
    assert caplog.records[-1].getMessage() == "after"
