"""The pair score the input-space baselines differentiate: cosine with the other modality's clean embedding.

Image methods act on the preprocessed pixels ``[B, 3, H, W]``; text methods on the rows of the token-embedding
table ``[B, L, D]`` (``L`` = the batch's longest SOT..EOT; causal attention makes each row exact whatever
its batch-mates), pooled at each row's EOT. Shared by ``fast_ig`` and ``mfaba``; not a method itself.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional, Tuple

import torch
from torch import Tensor

from clipib.models.split import SplitCLIP

ScoreFn = Callable[[Tensor], Tensor]
"""``inputs [B, ...] -> score [B]``, one independent score per row."""


def image_cosine(clip: SplitCLIP, target: Tensor) -> ScoreFn:
    """``pixels [B, 3, H, W] -> cos(image embedding, target) [B]``; ``target`` is ``[B, E]``, normalised."""

    def score(pixels: Tensor) -> Tensor:
        return (clip.image.encode(pixels) * target).sum(-1)

    return score


@dataclass
class TextInput:
    """The token-embedding rows of a batch of captions and the score as a function of them.

    Attributes:
        embeddings: ``[B, L, D]`` rows of the token-embedding table, ``L`` = the longest SOT..EOT.
        score: ``embeddings [B, L, D] -> cos(text embedding pooled at EOT, target) [B]``.
    """

    embeddings: Tensor
    score: ScoreFn


def text_cosine(clip: SplitCLIP, ids: Tensor, target: Tensor) -> TextInput:
    """Token-embedding input of ``ids`` ``[B, ctx]`` and its cosine with ``target`` ``[B, E]``."""
    pool_at = clip.text.eot_positions(ids)  # [B]
    length = int(pool_at.max()) + 1
    with torch.no_grad():
        emb = clip.text.token_embeddings(ids[:, :length])  # [B, L, D]

    def score(embeddings: Tensor) -> Tensor:
        return (clip.text.encode_embeddings(embeddings, pool_at) * target).sum(-1)

    return TextInput(emb, score)


def pixel_normalisation(clip: SplitCLIP) -> Optional[Tuple[Tensor, Tensor]]:
    """``(mean, std)`` ``[3]`` float64 of the model's preprocess (:attr:`SplitCLIP.normalization`).

    Preprocessed pixels are ``(p − mean) / std`` for raw pixels ``p`` in [0, 1].
    """
    mean, std = clip.normalization
    return torch.as_tensor(mean, dtype=torch.float64), torch.as_tensor(std, dtype=torch.float64)
