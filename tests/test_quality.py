"""Quality on the shipped clipib-shapes model (issue 6): do the maps point at the named object, do the
token scores find the colour and shape words? Measured against the random baseline on held-out pairs."""

import pytest
import torch

import clipib
from clipib.data.synthetic import ShapesDataset
from clipib.metrics.localization import pointing_game
from clipib.metrics.text_localization import topk_gold

N = 32


@pytest.fixture(scope="module")
def shapes():
    clip = clipib.load_clip("clipib-shapes")
    ds = ShapesDataset(N, seed=2, split="test", preprocess=clip.preprocess, tokenizer=clip.tokenize)
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


@pytest.mark.parametrize("name", ["m2ib", "nib", "adaib", "chefer"])  # chefer: the mean-pooled read-out
def test_pointing_game_far_above_random(scores, name):
    assert scores[name][0] >= scores["random"][0] + 0.15, scores


def test_nib_finds_the_gold_words(scores):
    """NIB's text hit rate (colour and shape words both in the top 2) is well above random's. M2IB and AdaIB
    are not, on this model: it matches by colour only, so the shape word carries no signal and the bottleneck
    keeps it no more than other tokens (docs/benchmarks.md §1)."""
    assert scores["nib"][1] >= scores["random"][1] + 0.15, scores
