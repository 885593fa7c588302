"""Gold tokens among the top-k scored tokens (share and hit)."""
import math
from types import SimpleNamespace

import pytest
import torch

from clipib.attribution import Attribution
from clipib.metrics import TextTopK, topk_gold

SOT, EOT = 49406, 49407
IDS = torch.tensor([[SOT, 320, 1125, 539, 736, EOT, 0, 0]])
GOLD = torch.tensor([[0, 0, 1, 0, 1, 0, 0, 0]]).bool()
CLIP = SimpleNamespace(text=SimpleNamespace(eot_positions=lambda ids: ids.argmax(-1)))  # what TextTopK reads


def test_hand_cases():
    s = torch.tensor([[0.0, 0.3, 0.9, 0.1, 0.8, 1.0, 5.0, 5.0]])  # EOT and padding score high
    assert topk_gold(s, GOLD, IDS, k=2) == (torch.tensor([1.0], dtype=torch.float64),) * 2
    share, hit = topk_gold(s, GOLD, IDS, k=2, include_special=True)  # EOT takes a slot; padding never counts
    assert (share.item(), hit.item()) == (0.5, 0.0)
    share, hit = topk_gold(s, GOLD, IDS, k=1)
    assert (share.item(), hit.item()) == (0.5, 0.0)
    s2 = torch.tensor([[0.0, 0.95, 0.9, 0.1, 0.8, 1.0, 0.0, 0.0]])
    assert topk_gold(s2, GOLD, IDS, k=2)[0].item() == 0.5
    assert topk_gold(s2, GOLD, IDS, k=3)[1].item() == 1.0


def test_constant_scores_and_ties_are_pessimistic():
    share, hit = topk_gold(torch.full((1, 8), 0.5), GOLD, IDS, k=2)
    assert (share.item(), hit.item()) == (0.0, 0.0)  # documented value, not NaN
    # a gold token tied with a non-gold token for 2nd place is out; the clear 1st is in
    s = torch.tensor([[0.0, 0.5, 0.9, 0.5, 0.5, 1.0, 0.0, 0.0]])
    assert topk_gold(s, GOLD, IDS, k=2)[0].item() == 0.5


def test_no_gold_is_skipped_and_counted():
    gold = torch.cat([GOLD, torch.zeros_like(GOLD)])
    ids = torch.cat([IDS, IDS])
    s = torch.rand(2, 8, generator=torch.Generator().manual_seed(0))
    assert math.isnan(topk_gold(s, gold, ids)[0][1].item())
    m = TextTopK(k=2)
    m.update(CLIP, {"ids": ids, "gold_tokens": gold}, Attribution(text=s), "text")
    hit = m.compute()["topk_hit"]
    assert (hit["n"].item(), hit["skipped"].item()) == (1, 1)


@pytest.mark.parametrize("value,idx", [("topk_share", 0), ("topk_hit", 1)])
def test_functional_equals_modular(value, idx):
    g = torch.Generator().manual_seed(1)
    ids = IDS.repeat(6, 1)
    gold = torch.rand(6, 8, generator=g) > 0.5
    gold[:, 1] = True
    s = torch.rand(6, 8, generator=g)
    m = TextTopK(k=2)
    m.update(CLIP, {"ids": ids[:4], "gold_tokens": gold[:4]}, Attribution(text=s[:4]), "text")
    m.update(CLIP, {"ids": ids[4:], "gold_tokens": gold[4:]}, Attribution(text=s[4:]), "text")
    ref = topk_gold(s, gold, ids, k=2)[idx]
    assert m.compute()[value]["mean"].item() == pytest.approx(ref.mean().item())


def test_topk_follows_a_siglip_towers_caption(tiny_family, make_siglip_ids):
    """On a last-pooled tower without SOT the first word competes and padding does not (caption_rule)."""
    from clipib.attribution.base import Attribution
    from clipib.metrics.text_localization import TextTopK

    clip = tiny_family("siglip")
    ids = make_siglip_ids([3], clip.context_length, 1000)  # words at 0..2, EOS padding from 3
    gold = torch.zeros_like(ids, dtype=torch.bool)
    gold[0, [0, 2]] = True
    scores = torch.zeros(ids.shape)
    scores[0, [0, 2]] = 0.9
    scores[0, 10] = 1.0  # padding: never a candidate
    out = TextTopK(k=2).update(clip, {"ids": ids, "gold_tokens": gold}, Attribution(text=scores), "text")
    assert out["topk_hit"].tolist() == [1.0]
