"""The one place for what methods (and the metrics that perturb inputs) share: the pair score — the cosine of
the explained tower's embedding with the other modality's clean embedding, on preprocessed pixels or on
token-embedding rows pooled at each row's EOT — reference inputs, the patch index map and per-pair random
streams. Token spans are the text tower's (:meth:`clipib.models.split.TextTower.span_mask`).
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable, Iterator, Literal, Tuple

import torch
from torch import Tensor

from clipib.models.split import SplitCLIP

PAD_ID = 0
"""The id open_clip's tokenizers pad with (in the OpenAI BPE vocabulary it is also the token ``!``)."""

Fill = Literal["black", "mean", "zero"]
FILLS = ("black", "mean", "zero")


def normalisation(clip: SplitCLIP, like: Tensor) -> Tuple[Tensor, Tensor]:
    """Per-channel ``(mean, std)`` ``[3, 1, 1]`` the model's preprocessing normalises with.

    Read from the model's preprocess (:attr:`SplitCLIP.normalization`).
    """
    mean, std = clip.normalization
    as_t = lambda v: torch.as_tensor(v, dtype=like.dtype, device=like.device).view(-1, 1, 1)  # noqa: E731
    return as_t(mean), as_t(std)


def reference_image(clip: SplitCLIP, images: Tensor, fill: Fill) -> Tensor:
    """A reference ("absent") image for each preprocessed image ``[B, 3, H, W]``, in the model's input space.

    ``"black"``: pixel value 0 in [0, 1] pixel space, i.e. ``−mean/std`` after normalisation.
    ``"mean"``: each image's own per-channel mean (what ROAR-style removal fills with).
    ``"zero"``: 0 after normalisation, i.e. the preprocessing's dataset-mean colour.
    """
    if fill == "black":
        mean, std = normalisation(clip, images)
        return (-mean / std).expand_as(images)
    if fill == "mean":
        return images.mean(dim=(-2, -1), keepdim=True).expand_as(images)
    if fill == "zero":
        return torch.zeros_like(images)
    raise ValueError(f"fill must be one of {FILLS}, got {fill!r}")


def cosine(emb: Tensor, target: Tensor) -> Tensor:
    """Row-wise cosine of L2-normalised embeddings ``[N, E]`` with targets ``[N, E]`` (or ``[1, E]``), ``[N]``.

    Tower embeddings are L2-normalised by contract (:meth:`~clipib.models.split.Tower.encode`), so the cosine
    is their dot product. Every method and metric scores a pair with this function.
    """
    return (emb * target).sum(-1)


def unit_rows(emb: Tensor) -> Tensor:
    """``[N]`` bool: the rows of ``emb`` ``[N, E]`` that are finite unit vectors.

    A tower's embedding is L2-normalised, so it is one unless the tower's output was the zero vector
    (``F.normalize`` then returns zero) or not finite: a pair with such an embedding has no defined cosine.

    >>> unit_rows(torch.tensor([[0.6, 0.8], [0.0, 0.0], [float("nan"), 0.0]]))
    tensor([ True, False, False])
    """
    norm = emb.detach().float().norm(dim=-1)
    return torch.isfinite(norm) & (norm > 0.5)


def patch_feature_mask(clip: SplitCLIP, device: torch.device) -> Tensor:
    """``[1, 1, H, W]`` long: the index ``row * gw + col`` of the patch each pixel belongs to."""
    (h, w), (gh, gw) = clip.image_size, clip.grid
    rows = torch.arange(h, device=device) * gh // h  # [H]
    cols = torch.arange(w, device=device) * gw // w  # [W]
    return (rows[:, None] * gw + cols[None, :])[None, None]


def draw_seed(generator: torch.Generator) -> int:
    """A 62-bit seed drawn from ``generator`` (advances it)."""
    return int(torch.randint(0, 2**62, (1,), generator=generator))


@contextmanager
def pair_rng(generator: torch.Generator) -> Iterator[None]:
    """Run a block whose library code samples from torch's global CPU RNG (Captum's samplers) on a stream
    seeded from ``generator``; the global RNG state is restored afterwards."""
    seed = draw_seed(generator)
    with torch.random.fork_rng(devices=[]):
        torch.default_generator.manual_seed(seed)
        yield


ScoreFn = Callable[[Tensor], Tensor]
"""``inputs [B, ...] -> score [B]``, one independent score per row."""


def image_cosine(clip: SplitCLIP, target: Tensor) -> ScoreFn:
    """``pixels [B, 3, H, W] -> cos(image embedding, target) [B]``; ``target`` is ``[B, E]``, normalised."""

    def score(pixels: Tensor) -> Tensor:
        return cosine(clip.image.encode(pixels), target)

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
    length = clip.text.valid_length(ids)  # the longest SOT..EOT (causal), the whole context (bidirectional)
    with torch.no_grad():
        emb = clip.text.token_embeddings(ids[:, :length])  # [B, L, D]

    def score(embeddings: Tensor) -> Tensor:
        return cosine(clip.text.encode_embeddings(embeddings, pool_at, ids[:, :length]), target)

    return TextInput(emb, score)
