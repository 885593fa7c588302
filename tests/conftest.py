"""Shared fixtures: a tiny random-weight CLIP (tests/data/tiny-clip.json) and a few pairs."""

from pathlib import Path

import pytest
import torch

import clipib

DATA = Path(__file__).parent / "data"
TINY = str(DATA / "tiny-clip.json")
CAPTIONS = ["a red circle", "there is a purple triangle in the picture", "a photo of a dog", "look"]

torch.set_num_threads(min(2, torch.get_num_threads()))


@pytest.fixture(scope="session")
def tiny_config() -> str:
    """Path of the tiny open_clip model config (for ``--model`` on command lines and ``load_clip``)."""
    return TINY


@pytest.fixture(scope="session")
def tiny_clip() -> clipib.SplitCLIP:
    """3-block towers, 32 px, patch 8 (4x4 grid), width 64, random weights (seed 0)."""
    torch.manual_seed(0)
    return clipib.load_clip(TINY, pretrained=None)


@pytest.fixture(scope="session")
def pairs(tiny_clip):
    """Four (image, ids) pairs with captions of different lengths."""
    gen = torch.Generator().manual_seed(1)
    images = torch.randn(4, 3, *tiny_clip.image_size, generator=gen)
    return images, tiny_clip.tokenize(CAPTIONS)
