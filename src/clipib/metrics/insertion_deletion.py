"""Batch-wise insertion / deletion curves and their AUC (InputIBA, Zhang et al. 2021, App. D.3).

Features are ranked by the attribution (highest first; ties keep index order - a stable sort) and
modified in ``steps`` equal batches ("batch-wise" deletion / insertion, App. D.3), so a curve has
``steps + 1`` points at fractions ``0, 1/steps, ..., 1`` of the features. At each point the score is
the cosine with the other modality, computed by a caller-supplied ``score_fn`` (:func:`image_scorer`,
:func:`text_scorer`), so the kernels do not depend on the model. AUC = trapezoid over the
fraction in [0, 1], in the score's units (cosine). Deletion: lower AUC is better; insertion: higher.

Images (a feature = one pixel, all channels):

* deletion replaces pixels with ``fill``; default ``"black"``: pixel value 0 mapped through the
  model's normalisation, ``(0 - mean) / std`` per channel (InputIBA deletes to black); ``"mean"``
  is 0 in normalised space (the dataset mean colour); a float / per-channel sequence is used as given
  (normalised space). ``"black"`` needs the model's ``mean`` / ``std``: the eval metric
  :class:`InsertionDeletion` reads them from the loaded model (:attr:`SplitCLIP.normalization`).
* insertion reveals pixels on a Gaussian-blurred copy of the image (InputIBA: kernel 29, sigma 15 at
  224 px). clipib scales both with the input size, per axis: ``sigma = 15 * size / 224`` and the
  kernel's radius, ``kernel = 2 * max(1, round(14 * size / 224)) + 1`` (5 at 32 px, 9 at 64 px).
  Blurring the normalised tensor equals blurring the pixels (normalisation is per-channel affine,
  the kernel sums to one).

Text (a feature = one content token strictly between SOT and EOT; SOT and EOT are always kept):
deletion replaces tokens with ``replacement_id``; insertion starts from all content tokens replaced and
restores them. InputIBA uses ``<unk>``; CLIP's vocabulary has none, so the default is id 0 - open_clip's
padding id (``"!"`` in CLIP's BPE), the blank token M2IB's Table 1 uses. Each caption is split into
``steps`` batches of its own length (``round(k * n / steps)`` tokens at step ``k``).

The literal "batch size 10" of App. D.3 (10 pixels per step) needs ``N / 10`` model calls per curve
(5,018 at 224 px); ``steps`` is a parameter (default 20, i.e. 5 % per step).

:class:`InsertionDeletion` is the eval metric (registry name ``insertion_deletion``; values
``{m}_insertion`` and ``{m}_deletion`` for m = image, text).
"""
from __future__ import annotations

from typing import Any, Callable, Dict, Optional, Sequence

import torch
from torch import Tensor

from clipib.attribution.base import Attribution
from clipib.attribution.common import image_cosine, text_cosine
from clipib.metrics.base import AttributionMetric, Batch, caption_rule, default_eot
from clipib.models.split import SplitCLIP, token_span
from clipib.removal import blur_params, blurred_canvas, deletion_fill  # noqa: F401  (public here too)

__all__ = [
    "blur_params",
    "blurred_canvas",
    "deletion_fill",
    "image_insertion_deletion",
    "text_insertion_deletion",
    "image_scorer",
    "text_scorer",
    "InsertionDeletion",
]

_MODES = ("deletion", "insertion")


def _ranks(scores: Tensor, valid: Tensor | None = None) -> Tensor:
    """Rank of each feature (0 = highest score; ties in index order; invalid features last)."""
    s = scores.double()
    if valid is not None:
        s = torch.where(valid, s, torch.full_like(s, -torch.inf))
    order = torch.sort(s, dim=1, descending=True, stable=True).indices  # [B, N]
    return torch.argsort(order, dim=1)  # [B, N]


def _check_mode(mode: str, steps: int) -> None:
    if mode not in _MODES:
        raise ValueError(f"mode must be one of {_MODES}, got {mode!r}")
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")


def image_insertion_deletion(
    images: Tensor,
    maps: Tensor,
    score_fn: Callable[[Tensor], Tensor],
    mode: str = "deletion",
    steps: int = 20,
    fill: str | float | Sequence[float] = "black",
    mean: Optional[Sequence[float]] = None,
    std: Optional[Sequence[float]] = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """Image deletion / insertion curve (InputIBA App. D.3): ``(auc [B], fractions [S+1], curves [B, S+1])``.

    Args:
        images: ``[B, C, H, W]`` normalised model inputs.
        maps: ``[B, H, W]`` attribution maps (only the order matters).
        score_fn: ``images [B, C, H, W] -> [B]``, e.g. :func:`image_scorer`.
        mode: ``"deletion"`` (to ``fill``) or ``"insertion"`` (onto the blurred canvas).
        steps: number of equal batches of pixels.
        fill: what deleted pixels become (:func:`deletion_fill`).
        mean, std: the model's normalisation (``clip.normalization``), needed by ``fill="black"``.
    """
    _check_mode(mode, steps)
    b, c, h, w = images.shape
    if maps.shape != (b, h, w):
        raise ValueError(f"maps must be [B, H, W] = {(b, h, w)}, got {tuple(maps.shape)}")
    rank = _ranks(maps.reshape(b, -1)).view(b, 1, h, w)  # [B, 1, H, W]
    base = deletion_fill(fill, c, mean, std).to(images) if mode == "deletion" else blurred_canvas(images)
    fractions = torch.linspace(0.0, 1.0, steps + 1, dtype=torch.float64)
    curve = []
    for frac in fractions.tolist():
        sel = rank < int(round(frac * h * w))  # [B, 1, H, W]
        x = torch.where(sel, base, images) if mode == "deletion" else torch.where(sel, images, base)
        curve.append(score_fn(x).detach().double().reshape(b))
    curves = torch.stack(curve, dim=1)  # [B, S+1]
    fractions = fractions.to(curves.device)
    return torch.trapezoid(curves, fractions, dim=1), fractions, curves


def text_insertion_deletion(
    ids: Tensor,
    scores: Tensor,
    score_fn: Callable[[Tensor], Tensor],
    mode: str = "deletion",
    steps: int = 20,
    replacement_id: int = 0,
    eot: Tensor | None = None,
    start: int = 1,
) -> tuple[Tensor, Tensor, Tensor]:
    """Token deletion / insertion curve: ``(auc [B], fractions [S+1], curves [B, S+1])``.

    Args:
        ids: ``[B, L]`` token ids; scores: ``[B, L]`` token attributions.
        score_fn: ``ids [B, L] -> [B]``, e.g. :func:`text_scorer`.
        replacement_id: the token put in place of a removed token (default 0, see module docstring).
        eot: EOT positions ``[B]`` (default ``ids.argmax(-1)``, open_clip's rule).
    """
    _check_mode(mode, steps)
    if scores.shape != ids.shape:
        raise ValueError(f"scores {tuple(scores.shape)} and ids {tuple(ids.shape)} differ in shape")
    content = token_span(default_eot(ids, eot), ids.shape[1], special=False, start=start)  # [B, L]
    rank = _ranks(scores, content)  # [B, L]
    n = content.sum(1, keepdim=True).double()  # [B, 1]
    blank = torch.full_like(ids, replacement_id)
    fractions = torch.linspace(0.0, 1.0, steps + 1, dtype=torch.float64)
    curve = []
    for frac in fractions.tolist():
        sel = content & (rank < torch.round(frac * n))  # [B, L]
        x = torch.where(sel, blank, ids) if mode == "deletion" else torch.where(content & ~sel, blank, ids)
        curve.append(score_fn(x).detach().double().reshape(ids.shape[0]))
    curves = torch.stack(curve, dim=1)  # [B, S+1]
    fractions = fractions.to(curves.device)
    return torch.trapezoid(curves, fractions, dim=1), fractions, curves


def image_scorer(clip: SplitCLIP, ids: Tensor) -> Callable[[Tensor], Tensor]:
    """``score(images [B, 3, H, W]) -> [B]``: cosine of the images with the clean captions ``ids``, no grad."""
    with torch.no_grad():
        score = image_cosine(clip, clip.text.encode(ids))  # target [B, E]
    return torch.no_grad()(score)


def text_scorer(clip: SplitCLIP, images: Tensor, ids: Tensor) -> Callable[[Tensor], Tensor]:
    """``score(ids' [B, ctx]) -> [B]``: cosine of perturbed captions with the clean ``images``, no grad.

    The text is pooled at the EOT positions of the *original* ``ids`` (``clip.text.eot_positions``), so a
    replacement token can never move the pooling position.
    """
    with torch.no_grad():
        text = text_cosine(clip, ids, clip.image.encode(images))  # target [B, E]
    length = text.embeddings.shape[1]  # longest SOT..EOT

    @torch.no_grad()
    def score(new_ids: Tensor) -> Tensor:
        return text.score(clip.text.token_embeddings(new_ids[:, :length]))

    return score


class InsertionDeletion(AttributionMetric):
    """Insertion and deletion AUC (InputIBA App. D.3), scored by the cosine with the other modality.

    Values ``{m}_insertion`` (higher is better) and ``{m}_deletion`` (lower is better) for m = image, text.
    ``fill="black"`` deletes pixels to black *in the loaded model's normalisation* (``clip.normalization``).

    Args:
        steps: number of equal batches of features per curve.
        fill: what deleted pixels become (:func:`deletion_fill`).
        replacement_id: the token put in place of a removed token.
        n_seeds: number of seeds aggregated.

    Example (the shipped model; curves have ``steps + 1`` points):
        >>> from clipib import load_clip
        >>> clip = load_clip("clipib-shapes")  # the shipped 64 px model
        >>> batch = {"image": torch.randn(2, 3, 64, 64), "ids": clip.tokenize(["a dog", "a red cat"])}
        >>> attr = Attribution(image=torch.rand(2, 64, 64), text=torch.rand(2, 77))
        >>> metric = InsertionDeletion(steps=2)
        >>> sorted(metric.update(clip, batch, attr, "text"))
        ['text_deletion', 'text_insertion']
    """

    VALUES = {"image": ("image_insertion", "image_deletion"), "text": ("text_insertion", "text_deletion")}
    higher_is_better = None

    def __init__(self, steps: int = 20, fill: str | float | Sequence[float] = "black", replacement_id: int = 0,
                 **kwargs: Any) -> None:
        super().__init__(**kwargs)
        _check_mode("deletion", steps)
        deletion_fill(fill, mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0))  # validate
        self.steps, self.fill, self.replacement_id = steps, fill, replacement_id

    def score(self, clip: SplitCLIP, batch: Batch, attr: Attribution, modality: str) -> Dict[str, Tensor]:
        """``{m}_insertion`` and ``{m}_deletion`` AUCs per sample."""
        images, ids = batch["image"], batch["ids"]
        out = {}
        if modality == "image":
            score, (mean, std) = image_scorer(clip, ids), clip.normalization
            for mode in ("insertion", "deletion"):
                out[f"image_{mode}"] = image_insertion_deletion(images, attr.image, score, mode, self.steps,
                                                                self.fill, mean, std)[0]
        else:
            score, (ends, start) = text_scorer(clip, images, ids), caption_rule(clip.text, ids)  # the caption
            for mode in ("insertion", "deletion"):
                out[f"text_{mode}"] = text_insertion_deletion(ids, attr.text, score, mode, self.steps,
                                                              self.replacement_id, ends, start)[0]
        return out
