"""Text counterpart of localization: do the ground-truth tokens rank among the top-k scored tokens?

Issue 5 item 6 (no paper defines it; clipib's definition). For each caption, candidates are the content
tokens strictly between SOT and EOT (``include_special=True`` adds SOT and EOT themselves; positions
outside SOT..EOT are always ignored). With ``G`` the gold positions:

* ``share = |G ∩ top_k| / |G|`` - the share of the gold tokens found among the top-k (recall@k);
* ``hit = 1`` when every gold token is in the top-k (issue 6's "text hit rate" uses k = 2), else 0.

SOT and EOT are excluded by default because they are never gold, and EOT - the pooling position of
CLIP's text tower - often receives a large score for reasons unrelated to the caption's content.

**Ties** (clipib's choice, pessimistic): a token is in the top-k when the number of candidates whose
score is ``>=`` its own (itself included) is at most ``k``; tokens tied across the k-th place are all
out. So a constant score vector over more than ``k`` candidates gives share 0 and hit 0 (not NaN), and
a method cannot gain by producing ties. Samples without gold tokens give NaN and are counted as skipped.

:class:`TextTopK` is the eval metric (registry name ``text_topk``; values ``topk_share``, ``topk_hit``,
text modality), reading the gold positions from ``batch["gold_tokens"]``.
"""
from __future__ import annotations

import math
from typing import Any, Dict

import torch
from torch import Tensor

from clipib.attribution.base import Attribution
from clipib.metrics.base import AttributionMetric, Batch, caption_rule, default_eot
from clipib.models.split import SplitCLIP, token_span

__all__ = ["topk_gold", "TextTopK"]


def topk_gold(
    scores: Tensor,
    gold: Tensor,
    ids: Tensor,
    k: int = 2,
    *,
    eot: Tensor | None = None,
    include_special: bool = False,
    start: int = 1,
) -> tuple[Tensor, Tensor]:
    """Per-sample ``(share, hit)``, each ``[B]`` float64; NaN where a sample has no gold token.

    Args:
        scores: ``[B, L]`` token scores (``Attribution.text`` or ``text_raw``).
        gold: ``BoolTensor[B, L]`` ground-truth token positions.
        ids: ``LongTensor[B, L]`` token ids (to find SOT..EOT).
        k: size of the top set.
        eot: EOT positions ``[B]``; default ``ids.argmax(-1)``.
        include_special: let SOT and EOT compete for the top-k.
        start: first content token (1 after a SOT; 0 for SigLIP-style towers, ``TextTower.content_start``).

    Example:
        >>> ids = torch.tensor([[49406, 320, 1125, 539, 49407]])
        >>> scores = torch.tensor([[0.0, 0.9, 0.1, 0.8, 1.0]])
        >>> gold = torch.tensor([[False, True, False, True, False]])
        >>> topk_gold(scores, gold, ids, k=2)
        (tensor([1.], dtype=torch.float64), tensor([1.], dtype=torch.float64))
    """
    if scores.shape != ids.shape or gold.shape != ids.shape:
        raise ValueError(f"scores, gold and ids must share a shape, got {tuple(scores.shape)}, "
                         f"{tuple(gold.shape)}, {tuple(ids.shape)}")
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    cand = token_span(default_eot(ids, eot), ids.shape[1], special=include_special, start=start)  # [B, L]
    g = gold.bool() & cand
    s = torch.where(cand, scores.double(), torch.full_like(scores, -math.inf, dtype=torch.float64))
    # number of candidates scoring >= each token (itself included)
    n_ge = ((s[:, None, :] >= s[:, :, None]) & cand[:, None, :]).sum(-1)  # [B, L]
    in_top = cand & (n_ge <= k)
    n_gold = g.sum(1).double()
    found = (g & in_top).sum(1).double()
    share = found / n_gold.clamp(min=1)
    hit = (found == n_gold).double()
    nan = torch.full_like(share, math.nan)
    has_gold = n_gold > 0
    return torch.where(has_gold, share, nan), torch.where(has_gold, hit, nan)


class TextTopK(AttributionMetric):
    """Share of the gold tokens among the top-``k`` content tokens (``topk_share``) and the all-gold hit
    (``topk_hit``; issue 6 uses ``k = 2``), text modality; see :func:`topk_gold`.

    Example:
        >>> from types import SimpleNamespace
        >>> clip = SimpleNamespace(text=SimpleNamespace(eot_positions=lambda ids: ids.argmax(-1)))
        >>> batch = {"ids": torch.tensor([[49406, 320, 1125, 539, 49407]]),
        ...          "gold_tokens": torch.tensor([[False, True, False, True, False]])}
        >>> attr = Attribution(text=torch.tensor([[0.0, 0.9, 0.1, 0.8, 1.0]]))
        >>> TextTopK(k=2).update(clip, batch, attr, "text")
        {'topk_share': tensor([1.], dtype=torch.float64), 'topk_hit': tensor([1.], dtype=torch.float64)}
    """

    VALUES = {"text": ("topk_share", "topk_hit")}
    higher_is_better = True

    def __init__(self, k: int = 2, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        self.k = k

    def score(self, clip: SplitCLIP, batch: Batch, attr: Attribution, modality: str) -> Dict[str, Tensor]:
        """``topk_share`` and ``topk_hit`` per sample (NaN without gold tokens)."""
        if batch.get("gold_tokens") is None:
            raise ValueError("metric 'text_topk' needs batch['gold_tokens']")
        ids = batch["ids"]
        ends, start = caption_rule(clip.text, ids)
        share, hit = topk_gold(attr.text, batch["gold_tokens"], ids, self.k, eot=ends, start=start)
        return {"topk_share": share, "topk_hit": hit}
