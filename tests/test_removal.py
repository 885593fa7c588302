"""The shared removal kernel (clipib.removal): which features, what they become, per sample and batch-free."""

import numpy as np
import pytest
import torch

from clipib import removal as R


def _maps(b=5, h=6, w=7, seed=0):
    return torch.rand(b, h, w, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("fraction", [0.0, 0.1, 0.25, 0.5, 0.9, 1.0])
def test_rank_mode_removes_the_nominal_count_of_the_top_features(fraction):
    maps = _maps()
    gone = R.top_fraction_mask(maps, fraction)
    n = maps[0].numel()
    assert gone.shape == maps.shape and gone.dtype == torch.bool
    assert gone.flatten(1).sum(1).tolist() == [int(np.floor(fraction * n + 0.5))] * maps.shape[0]
    for m, g in zip(maps, gone):  # every removed value is above every kept one
        if g.any() and (~g).any():
            assert m[g].min() > m[~g].max()


def test_per_sample_fractions_and_valid_features():
    ids_like = torch.rand(3, 10, generator=torch.Generator().manual_seed(1))
    valid = torch.zeros(3, 10, dtype=torch.bool)
    valid[0, 1:4], valid[1, 1:9], valid[2, 1:6] = True, True, True  # 3, 8, 5 content tokens
    gone = R.top_fraction_mask(ids_like, torch.tensor([1.0, 0.5, 0.1]), valid)
    assert gone.sum(1).tolist() == [3, 4, 1]  # 0.1 * 5 = 0.5 rounds up
    assert not (gone & ~valid).any()
    assert gone[1].nonzero().flatten().tolist() == sorted(
        (ids_like[1, 1:9].argsort(descending=True)[:4] + 1).tolist())


@pytest.mark.parametrize("n", [1, 2, 3, 5, 10, 42, 100])
def test_rank_with_a_quantile_equals_the_threshold_rule_on_tie_free_maps(n):
    maps = torch.rand(6, n, generator=torch.Generator().manual_seed(n)).double()
    valid = torch.rand(6, n, generator=torch.Generator().manual_seed(n + 1)) < 0.8
    for q in (0.0, 0.29, 0.5, 0.75, 0.9, 1.0):
        for v in (None, valid):
            rank = R.top_fraction_mask(maps, quantile=q, valid=v)
            assert torch.equal(rank, R.top_fraction_mask(maps, quantile=q, valid=v, ties="threshold")), (q, v)
            if v is None:
                want = [int((m > np.percentile(m, 100 * q)).sum()) for m in maps.numpy()]
                assert rank.sum(1).tolist() == want
    tokens = torch.tensor([[0.2, 0.9, 0.5]])
    assert R.top_fraction_mask(tokens, quantile=0.9).tolist() == [[False, True, False]]  # AdaIB: 1 of 3 tokens
    assert R.top_fraction_mask(tokens, 0.1).sum() == 0  # a fraction rounds: 0.3 tokens -> none


def test_threshold_mode_is_numpys_percentile_rule():
    maps = _maps(b=4, h=5, w=5).double()
    maps[1] = (maps[1] > 0.5).double()  # plateaus
    for q in (0.5, 0.75, 0.9):
        gone = R.top_fraction_mask(maps, quantile=q, ties="threshold")
        for m, g in zip(maps.numpy(), gone.numpy()):
            np.testing.assert_array_equal(g, m > np.percentile(m, 100 * q))


def test_threshold_mode_with_valid_uses_only_valid_values():
    s = torch.tensor([[9.0, 1.0, 2.0, 3.0, 4.0, -5.0]])
    valid = torch.tensor([[False, True, True, True, True, False]])
    gone = R.top_fraction_mask(s, quantile=0.5, valid=valid, ties="threshold")
    assert gone.tolist() == [[False, False, False, True, True, False]]  # median of 1..4 = 2.5


def test_ties_are_deterministic_index_order_or_the_tiebreak():
    flat = torch.zeros(2, 8)
    assert R.top_fraction_mask(flat, 0.25)[0].nonzero().flatten().tolist() == [0, 1]
    tb = torch.arange(8.0).expand(2, 8)
    assert R.top_fraction_mask(flat, 0.25, tiebreak=tb)[0].nonzero().flatten().tolist() == [6, 7]
    binary = torch.tensor([[0.0, 1.0, 0.0, 1.0, 1.0, 0.0, 0.0, 0.0]])  # the map beats the tiebreak
    assert R.top_fraction_mask(binary, 0.25, tiebreak=-torch.arange(8.0)[None]).nonzero()[:, 1].tolist() == [1, 3]


def _lexicographic_top(maps, k, valid, tiebreak):
    """The reference rule, written out: sort every feature by (valid, value, tiebreak) descending, index
    ascending, and keep the first k of each row."""
    out = torch.zeros(maps.shape, dtype=torch.bool)
    for b in range(maps.shape[0]):
        feats = sorted(range(maps.shape[1]), key=lambda i: (not bool(valid[b, i]), -float(maps[b, i]),
                                                            -float(tiebreak[b, i]), i))
        out[b, [i for i in feats[: int(k[b])] if valid[b, i]]] = True
    return out


@pytest.mark.parametrize("levels", [2, 5, 0])  # binary maps, few values (many ties), continuous
def test_rank_mode_equals_a_full_lexicographic_sort(levels):
    gen = torch.Generator().manual_seed(levels)
    maps = torch.rand(4, 300, generator=gen)
    if levels:
        maps = (maps * levels).floor()
    maps[0, :10] = float("nan")
    valid = torch.rand(4, 300, generator=gen) > 0.2
    tiebreak = torch.randn(4, 300, generator=gen).round(decimals=1)  # ties in the tiebreak too: index decides
    fractions = torch.tensor([0.0, 0.25, 0.5, 1.0])
    got = R.top_fraction_mask(maps, fractions, valid=valid, tiebreak=tiebreak)
    n = (valid & ~torch.isnan(maps)).sum(1)
    k = torch.floor(fractions.double() * n + 0.5 + 1e-9)
    ok = valid & ~torch.isnan(maps)
    assert torch.equal(got, _lexicographic_top(maps.nan_to_num(-1e9), k, ok, tiebreak))
    assert torch.equal(got.sum(1), k.long())


def test_nan_features_are_never_removed_nor_counted():
    m = torch.tensor([[float("nan"), 0.3, 0.2, 0.1, float("nan")]])
    gone = R.top_fraction_mask(m, 1.0)
    assert gone.tolist() == [[False, True, True, True, False]]
    assert R.top_fraction_mask(m, 0.34).tolist() == [[False, True, False, False, False]]


def test_bad_arguments_raise():
    m = _maps()
    with pytest.raises(ValueError, match="exactly one"):
        R.top_fraction_mask(m)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        R.top_fraction_mask(m, 1.5)
    with pytest.raises(ValueError, match="ties"):
        R.top_fraction_mask(m, 0.5, ties="random")
    with pytest.raises(ValueError, match="valid"):
        R.top_fraction_mask(m, 0.5, torch.ones(5, 6, dtype=torch.bool))
    with pytest.raises(ValueError, match="fill"):
        R.remove_image(torch.zeros(1, 3, 4, 4), torch.zeros(1, 4, 4, dtype=torch.bool), "gray")
    with pytest.raises(ValueError, match="seeds"):
        R.remove_image(torch.zeros(1, 3, 4, 4), torch.zeros(1, 4, 4, dtype=torch.bool), "road")


def test_mean_fill_is_each_images_own_channel_mean():
    x = torch.randn(3, 3, 8, 8, generator=torch.Generator().manual_seed(2))
    gone = R.top_fraction_mask(_maps(3, 8, 8), 0.25)
    out = R.remove_image(x, gone)
    means = x.mean(dim=(2, 3))  # [B, C]
    for i in range(3):
        assert torch.allclose(out[i][:, gone[i]], means[i][:, None].expand(-1, int(gone[i].sum())))
        assert torch.equal(out[i][:, ~gone[i]], x[i][:, ~gone[i]])


def test_constant_black_and_blur_fills():
    x = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(3))
    gone = R.top_fraction_mask(_maps(2, 8, 8), 0.5)
    assert torch.all(R.remove_image(x, gone, 0.25)[gone[:, None].expand_as(x)] == 0.25)
    black = R.remove_image(x, gone, "black", mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))
    assert torch.all(black[gone[:, None].expand_as(x)] == -2.0)
    blur = R.remove_image(x, gone, "blur")
    assert torch.allclose(blur, torch.where(gone[:, None], R.blurred_canvas(x), x))


@pytest.mark.parametrize("fill", ["mean", "blur", "road", 0.5])
def test_batch_equals_single_and_no_leak_across_samples(fill):
    x = torch.randn(4, 3, 12, 12, generator=torch.Generator().manual_seed(4))
    gone = R.top_fraction_mask(_maps(4, 12, 12, seed=5), 0.25)
    seeds = R.key_seeds(["a", "b", "c", "d"])
    batch = R.remove_image(x, gone, fill, seeds=seeds)
    for i in range(4):
        one = R.remove_image(x[i:i + 1], gone[i:i + 1], fill, seeds=seeds[i:i + 1])
        assert torch.allclose(batch[i:i + 1], one, atol=1e-5)
    other = x.clone()
    other[1:] = torch.randn(3, 3, 12, 12)  # change every other sample: sample 0 must not move
    assert torch.allclose(R.remove_image(other, gone, fill, seeds=seeds)[0], batch[0], atol=1e-5)


def test_road_noise_sits_on_removed_pixels_only_and_follows_the_seed():
    x = torch.randn(2, 3, 10, 10, generator=torch.Generator().manual_seed(6))
    gone = R.top_fraction_mask(_maps(2, 10, 10), 0.3)
    clean = R.remove_image(x, gone, "road", noise=0.0)
    noisy = R.remove_image(x, gone, "road", noise=0.5, seeds=[1, 2])
    diff = noisy - clean
    assert torch.equal(diff[~gone[:, None].expand_as(x)], torch.zeros(int((~gone).sum()) * 3))
    assert 0.3 < diff[gone[:, None].expand_as(x)].std() < 0.7
    again = R.remove_image(x, gone, "road", noise=0.5, seeds=[1, 3])
    assert torch.equal(again[0], noisy[0]) and not torch.equal(again[1], noisy[1])


def test_road_imputes_a_linear_ramp_exactly():
    ramp = (torch.arange(8.0)[None, :] + 2 * torch.arange(8.0)[:, None]).expand(1, 3, 8, 8).clone()
    gone = torch.zeros(1, 8, 8, dtype=torch.bool)
    gone[0, 2:5, 3:6] = True
    out = R.remove_image(ramp, gone, "road", noise=0.0, iters=100)
    assert torch.allclose(out, ramp, atol=1e-4)


def test_keyed_normal_is_standard_normal_and_batch_free():
    z = R.keyed_normal([11], (200_000,))[0]
    assert abs(float(z.mean())) < 0.01 and abs(float(z.std()) - 1) < 0.01
    assert abs(float((z[1:] * z[:-1]).mean())) < 0.01  # neighbours uncorrelated
    pair = R.keyed_normal([3, 4], (5, 5))
    assert torch.equal(pair[1], R.keyed_normal([4], (5, 5))[0]) and not torch.equal(pair[0], pair[1])


def test_remove_tokens_and_content_tokens():
    ids = torch.tensor([[49406, 320, 1125, 533, 49407, 0], [49406, 900, 49407, 0, 0, 0]])
    content = R.content_tokens(ids)
    assert content.int().tolist() == [[0, 1, 1, 1, 0, 0], [0, 1, 0, 0, 0, 0]]
    scores = torch.tensor([[9.0, 0.1, 0.9, 0.5, 9.0, 9.0], [9.0, 0.2, 9.0, 9.0, 9.0, 9.0]])
    gone = R.top_fraction_mask(scores, 0.5, content)  # 2 of 3 tokens, 1 of 1 (0.5 rounds up)
    assert R.remove_tokens(ids, gone).tolist() == [[49406, 320, 0, 0, 49407, 0], [49406, 0, 49407, 0, 0, 0]]
    eot = R.remove_tokens(ids, gone, R.EOT_ID)
    assert eot[0].tolist() == [49406, 320, 49407, 49407, 49407, 0]
    assert R.PAD_ID == 0 and R.EOT_ID == 49407


def test_old_names_stay_importable_from_the_metrics():
    from clipib.metrics import insertion_deletion, perturbation

    assert perturbation.road_impute is R.road_impute and perturbation.image_fill is R.image_fill
    assert insertion_deletion.blurred_canvas is R.blurred_canvas
    assert insertion_deletion.deletion_fill is R.deletion_fill and insertion_deletion.blur_params is R.blur_params
