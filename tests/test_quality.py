"""Quality on the shipped clipib-shapes model (issue 6): do the maps point at the named object, do the
token scores find the colour and shape words? Measured against the random baseline on held-out pairs."""

import pytest
import torch

import clipib
from clipib.data.sources import ModelTransforms, ShapesDataset
from clipib.metrics.localization import pointing_game
from clipib.metrics.text_localization import topk_gold

N = 32


@pytest.fixture(scope="module")
def shapes():
    clip = clipib.load_clip("clipib-shapes")
    ds = ShapesDataset(N, seed=2, split="test")
    ds.use_transforms(ModelTransforms.from_clip(clip))
    batch = next(iter(torch.utils.data.DataLoader(ds, batch_size=N)))
    return clip, batch


@pytest.fixture(scope="module")
def scores(shapes):
    """Pointing-game accuracy and text hit rate (both gold tokens in the top 2) per method."""
    clip, batch = shapes
    seeds = list(range(N))
    out = {}
    for name in ("m2ib", "nib", "adaib", "chefer", "random"):
        attr = clipib.METHODS[name](clip).attribute(batch["image"], batch["ids"], seeds=seeds)
        pg = pointing_game(attr.image, batch["mask"]).mean().item()
        share, hit = topk_gold(attr.text, batch["gold_tokens"], batch["ids"], k=2)
        out[name] = (pg, hit.float().mean().item(), share.float().mean().item())
    print(out)
    return out


@pytest.mark.parametrize("name", ["m2ib", "adaib", "chefer"])  # chefer: the mean-pooled read-out
def test_pointing_game_far_above_random(scores, name):
    assert scores[name][0] >= scores["random"][0] + 0.15, scores


def test_nib_pointing_game_needs_a_complete_path(shapes, scores):
    """NIB at the paper's setting (10-step right Riemann sum, default layer 3 of this tower's 4 blocks) points at
    the object 0.22 of the time (random 0.06); the same integral on the dense log-spaced path (``path="log"``,
    complete to 5 decimals, REFERENCE_NOTES §2) points at it 0.66 of the time. The 10-step sum misses the steep
    part of the path near the zero baseline, and on this model that moves the map's maximum off the object: a
    finding about NIB's published setting (docs/benchmarks.md §1), so the test asserts both halves."""
    clip, batch = shapes
    attr = clipib.METHODS["nib"](clip, path="log").attribute(batch["image"], batch["ids"], modality="image")
    complete = pointing_game(attr.image, batch["mask"]).mean().item()
    assert complete >= scores["random"][0] + 0.15, (complete, scores)
    assert complete >= scores["nib"][0] + 0.2, (complete, scores)
    assert scores["nib"][0] > scores["random"][0], scores


def test_nib_finds_the_gold_words(scores):
    """NIB's text hit rate (colour and shape words both in the top 2) is well above random's."""
    assert scores["nib"][1] >= scores["random"][1] + 0.15, scores


@pytest.mark.parametrize("name", ["m2ib", "adaib"])
def test_bottleneck_text_maps_find_the_gold_words_at_the_input(shapes, scores, name):
    """M2IB and AdaIB find the colour and shape words when the bottleneck sits on the token embeddings
    (``layer=0``: hit 0.84 / 0.78, random 0.22). At their default text layer (2 of this tower's 3 blocks, scaled
    from the papers' ViT-B/32 setting) they do not (0.16 / 0.06): by then the causal tower has moved the words'
    content to later positions, so restricting the word positions costs the similarity little. A finding about
    layer placement, with the per-layer numbers in docs/benchmarks.md §1."""
    clip, batch = shapes
    attr = clipib.METHODS[name](clip, layer=0).attribute(batch["image"], batch["ids"], modality="text",
                                                         seeds=list(range(N)))
    _, hit = topk_gold(attr.text, batch["gold_tokens"], batch["ids"], k=2)
    assert hit.float().mean().item() >= scores["random"][1] + 0.15, (hit.float().mean().item(), scores["random"])
    assert scores[name][1] < hit.float().mean().item(), "the default (deeper) layer finds the words less often"
