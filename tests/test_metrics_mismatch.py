"""Matched-vs-mismatched AUROC (AdaIB App. C) and its map helpers."""
import math

import pytest
import torch

from clipib.metrics import MismatchAUROC, map_entropy, map_mass, mismatch_auroc


def test_auroc_hand_cases():
    matched = torch.tensor([True, True, False, False])
    # positives {0.4, 0.2}, negatives {0.1, 0.35}: 3 of 4 pairs ordered -> 0.75
    assert mismatch_auroc(torch.tensor([0.4, 0.2, 0.1, 0.35]), matched).item() == pytest.approx(0.75)
    # a tie between a positive and a negative counts one half: 3.5 / 4
    assert mismatch_auroc(torch.tensor([0.4, 0.35, 0.1, 0.35]), matched).item() == pytest.approx(0.875)
    s = torch.tensor([0.4, 0.2, 0.1, 0.35])
    assert mismatch_auroc(s, matched, "matched_low").item() == pytest.approx(0.25)
    assert mismatch_auroc(-s, matched, "either_optimistic").item() == pytest.approx(0.75)


def test_large_scores_are_not_saturated():
    # losses far outside [0, 1]: a sigmoid would map all of them to 1.0 in float32 (AUROC 0.5)
    scores = torch.tensor([40.0, 60.0, 50.0, 70.0])
    matched = torch.tensor([False, True, False, True])
    assert mismatch_auroc(scores, matched).item() == pytest.approx(1.0)
    assert mismatch_auroc(scores + 1e4, matched).item() == pytest.approx(1.0)
    assert torch.sigmoid(scores).unique().numel() == 1  # what torchmetrics would have ranked


def test_functional_equals_modular():
    g = torch.Generator().manual_seed(0)
    scores = torch.randn(20, generator=g) * 5
    matched = torch.rand(20, generator=g) > 0.5
    metric = MismatchAUROC()
    for i in range(0, 20, 6):
        metric.update(scores[i : i + 6], matched[i : i + 6])
    assert metric.compute()["mean"].item() == pytest.approx(mismatch_auroc(scores, matched).item())
    # brute-force Mann-Whitney statistic
    pos, neg = scores[matched], scores[~matched]
    u = ((pos[:, None] > neg[None]).double() + 0.5 * (pos[:, None] == neg[None]).double()).mean()
    assert metric.compute()["mean"].item() == pytest.approx(u.item(), abs=1e-6)
    assert (metric.compute()["std"].item(), metric.compute()["n"].item()) == (0.0, 20.0)


def test_per_seed_mean_std_and_left_out_seeds():
    g = torch.Generator().manual_seed(2)
    scores = torch.randn(3, 10, generator=g)
    matched = torch.rand(3, 10, generator=g) > 0.5
    matched[:, 0], matched[:, 1] = True, False
    metric = MismatchAUROC(orientation="matched_low", n_seeds=4)
    for s in range(3):
        metric.update(scores[s, :6], matched[s, :6], seed_index=s)
        metric.update(scores[s, 6:], matched[s, 6:], seed_index=s)
    metric.update(torch.tensor([0.1, float("nan"), 0.3]), torch.tensor([True, False, True]), seed_index=3)
    per_seed = torch.stack([mismatch_auroc(scores[s], matched[s], "matched_low") for s in range(3)]).double()
    out = metric.compute()
    assert out["mean"].item() == pytest.approx(per_seed.mean().item())  # seed 3: all matched once NaN is left out
    assert out["std"].item() == pytest.approx(per_seed.std().item(), rel=1e-5)
    assert out["n"].item() == 2  # the scored pairs of the last seed
    none = MismatchAUROC(n_seeds=2)
    none.update(torch.tensor([0.1, 0.2]), torch.tensor([True, True]), seed_index=1)
    assert none.compute() == {} and MismatchAUROC().compute() == {}


def test_map_helpers():
    assert map_entropy(torch.ones(1, 4, 4)).item() == pytest.approx(1.0)
    assert map_entropy(torch.zeros(1, 4, 4)).item() == pytest.approx(1.0)  # documented: uniform, not NaN
    delta = torch.zeros(1, 4, 4)
    delta[0, 1, 1] = 0.7
    assert map_entropy(delta).item() == pytest.approx(0.0)
    two = torch.tensor([[1.0, 1.0, 0.0, 0.0]])
    assert map_entropy(two, normalized=False).item() == pytest.approx(math.log(2))
    valid = torch.tensor([[True, True, True, False]])
    assert map_entropy(two, valid).item() == pytest.approx(math.log(2) / math.log(3))
    assert map_mass(torch.tensor([[-1.0, 3.0, 100.0]]), torch.tensor([[True, True, False]])).item() == 1.0
    with pytest.raises(ValueError, match="non-negative"):
        map_entropy(torch.tensor([[-1.0, 1.0]]))


def test_bad_input():
    with pytest.raises(ValueError, match="orientation"):
        MismatchAUROC(orientation="up")
    with pytest.raises(ValueError, match="differ in length"):
        MismatchAUROC().update(torch.zeros(3), torch.zeros(2, dtype=torch.bool))
    with pytest.raises(IndexError, match="seed_index"):
        MismatchAUROC(n_seeds=2).update(torch.zeros(2), torch.zeros(2, dtype=torch.bool), seed_index=2)
