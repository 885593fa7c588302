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
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

from clipib.metrics._base import SampleMeanMetric

__all__ = ["content_positions", "topk_gold", "TopKGoldShare", "TopKGoldHit"]


def content_positions(ids: Tensor, eot: Tensor | None = None, include_special: bool = False) -> Tensor:
    """``BoolTensor[B, L]``: positions strictly between SOT (position 0) and EOT.

    ``eot`` (``LongTensor[B]``) defaults to ``ids.argmax(-1)``, open_clip's pooling rule (EOT has the
    largest id in CLIP's vocabulary); pass ``clip.text.eot_positions(ids)`` for other tokenizers.

    Example:
        >>> content_positions(torch.tensor([[49406, 320, 1125, 49407, 0]])).int()
        tensor([[0, 1, 1, 0, 0]], dtype=torch.int32)
    """
    if eot is None:
        eot = ids.argmax(-1)
    pos = torch.arange(ids.shape[1], device=ids.device)[None, :]  # [1, L]
    if include_special:
        return pos <= eot[:, None]
    return (pos >= 1) & (pos < eot[:, None])


def topk_gold(
    scores: Tensor,
    gold: Tensor,
    ids: Tensor,
    k: int = 2,
    *,
    eot: Tensor | None = None,
    include_special: bool = False,
) -> tuple[Tensor, Tensor]:
    """Per-sample ``(share, hit)``, each ``[B]`` float64; NaN where a sample has no gold token.

    Args:
        scores: ``[B, L]`` token scores (``Attribution.text`` or ``text_raw``).
        gold: ``BoolTensor[B, L]`` ground-truth token positions.
        ids: ``LongTensor[B, L]`` token ids (to find SOT..EOT).
        k: size of the top set.
        eot: EOT positions ``[B]``; default ``ids.argmax(-1)``.
        include_special: let SOT and EOT compete for the top-k.

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
    cand = content_positions(ids, eot, include_special)  # [B, L]
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


class TopKGoldShare(SampleMeanMetric):
    """Mean share of gold tokens among the top-``k`` scored content tokens; see :func:`topk_gold`.

    Example:
        >>> metric = TopKGoldShare(k=1)
        >>> ids = torch.tensor([[49406, 320, 1125, 49407]])
        >>> metric.update(torch.tensor([[0.0, 0.2, 0.7, 1.0]]), torch.tensor([[0, 1, 1, 0]]).bool(), ids)
        >>> metric.compute()
        tensor(0.5000, dtype=torch.float64)
    """

    def __init__(self, k: int = 2, include_special: bool = False, **kwargs) -> None:
        super().__init__(**kwargs)
        self.k = k
        self.include_special = include_special

    def update(self, scores: Tensor, gold: Tensor, ids: Tensor, eot: Tensor | None = None) -> None:
        """``scores [B, L]``, ``gold BoolTensor[B, L]``, ``ids [B, L]``, optional ``eot [B]``."""
        self._accumulate(topk_gold(scores, gold, ids, self.k, eot=eot, include_special=self.include_special)[0])


class TopKGoldHit(SampleMeanMetric):
    """Hit rate: all gold tokens among the top-``k`` content tokens (issue 6: ``k = 2``).

    Example:
        >>> metric = TopKGoldHit(k=2)
        >>> ids = torch.tensor([[49406, 320, 1125, 539, 49407]])
        >>> metric.update(torch.tensor([[0.0, 0.9, 0.1, 0.8, 1.0]]), torch.tensor([[0, 1, 0, 1, 0]]).bool(), ids)
        >>> metric.compute()
        tensor(1., dtype=torch.float64)
    """

    def __init__(self, k: int = 2, include_special: bool = False, **kwargs) -> None:
        super().__init__(**kwargs)
        self.k = k
        self.include_special = include_special

    def update(self, scores: Tensor, gold: Tensor, ids: Tensor, eot: Tensor | None = None) -> None:
        """``scores [B, L]``, ``gold BoolTensor[B, L]``, ``ids [B, L]``, optional ``eot [B]``."""
        self._accumulate(topk_gold(scores, gold, ids, self.k, eot=eot, include_special=self.include_special)[1])
