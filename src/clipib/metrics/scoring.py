"""Model-side scorers for the perturbation metrics: cosine of perturbed inputs with the other modality.

These use only the SplitCLIP contract (DESIGN.md §3): ``clip.image.encode``, ``clip.text.encode``,
``clip.text.token_embeddings``, ``clip.text.encode_embeddings(tok_emb, pool_at)`` and
``clip.text.eot_positions``. Embeddings are L2-normalised by contract, so a dot product is the cosine.
Everything runs under ``torch.no_grad()``.
"""
from __future__ import annotations

from typing import Any, Callable

import torch
from torch import Tensor

__all__ = ["image_scorer", "text_scorer", "cosine"]

Scorer = Callable[[Tensor], Tensor]


def cosine(a: Tensor, b: Tensor) -> Tensor:
    """Row-wise cosine of ``[B, E]`` embeddings (re-normalised, so unnormalised inputs work too)."""
    return torch.nn.functional.cosine_similarity(a.float(), b.float(), dim=-1)


def image_scorer(clip: Any, ids: Tensor) -> Scorer:
    """``score(images [B, 3, H, W]) -> [B]``: cosine of the images with the clean captions ``ids``."""
    with torch.no_grad():
        text_emb = clip.text.encode(ids)  # [B, E]

    def score(images: Tensor) -> Tensor:
        with torch.no_grad():
            return cosine(clip.image.encode(images), text_emb)

    return score


def text_scorer(clip: Any, images: Tensor, ids: Tensor) -> Scorer:
    """``score(ids' [B, L]) -> [B]``: cosine of perturbed captions with the clean ``images``.

    The text is pooled at the EOT positions of the *original* ``ids`` (``clip.text.eot_positions``),
    so a replacement token can never move the pooling position.
    """
    with torch.no_grad():
        image_emb = clip.image.encode(images)  # [B, E]
        eot = clip.text.eot_positions(ids)  # [B]

    def score(new_ids: Tensor) -> Tensor:
        with torch.no_grad():
            emb = clip.text.encode_embeddings(clip.text.token_embeddings(new_ids), eot)  # [B, E]
            return cosine(emb, image_emb)

    return score
