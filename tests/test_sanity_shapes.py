"""The model-randomisation sanity check on the shipped clipib-shapes model (Adebayo et al. 2018; M2IB Sec. 4.5):
M2IB's and Grad-CAM's image maps decorrelate from the trained model's as the image tower is randomised from the
top, and the random baseline's maps do not change with the weights."""
import pytest
import torch

import clipib
from clipib.data.sources import ModelTransforms, ShapesDataset
from clipib.metrics import ModelRandomisation

N = 8
FRACTIONS = (0.0, 0.25, 0.5, 0.75, 1.0)  # the projection, then 1..4 of the tower's 4 blocks


@pytest.fixture(scope="module")
def shapes():
    clip = clipib.load_clip("clipib-shapes")
    ds = ShapesDataset(N, seed=2, split="test")
    ds.use_transforms(ModelTransforms.from_clip(clip))
    return clip, next(iter(torch.utils.data.DataLoader(ds, batch_size=N)))


def _curve(shapes, name, **settings):
    """Mean rho_abs per cascade step."""
    clip, batch = shapes
    seeds = list(range(N))
    method = clipib.METHODS[name](clip, **settings)
    attr = method.attribute(batch["image"], batch["ids"], "image", seeds=seeds)
    values = ModelRandomisation(fractions=FRACTIONS).update(clip, batch, attr, "image", method=method, seeds=seeds)
    return [values[f"image_mprt_rho_abs_{round(100 * f):03d}"].mean().item() for f in FRACTIONS]


def test_m2ib_decorrelates_as_blocks_are_randomised(shapes):
    curve = _curve(shapes, "m2ib", steps=3)
    assert curve[-1] < 0.3 and curve[-1] < curve[0] - 0.5, curve
    assert all(b <= a + 0.05 for a, b in zip(curve, curve[1:])), curve  # falls step by step


def test_grad_cam_decorrelates(shapes):
    curve = _curve(shapes, "grad_cam")
    assert max(curve) < 0.5, curve  # far from the unrandomised 1.0 from the first step on


def test_random_does_not_depend_on_the_weights(shapes):
    assert _curve(shapes, "random") == pytest.approx([1.0] * len(FRACTIONS))
