"""Batch-wise insertion / deletion curves and their AUC (InputIBA, Zhang et al. 2021, App. D.3).

Features are ranked by the attribution (highest first; ties keep index order - a stable sort) and
modified in ``steps`` equal batches ("batch-wise" deletion / insertion, App. D.3), so a curve has
``steps + 1`` points at fractions ``0, 1/steps, ..., 1`` of the features. At each point the score is
the cosine with the other modality, computed by a caller-supplied ``score_fn`` (see
:mod:`clipib.metrics.scoring`), so the kernels do not depend on the model. AUC = trapezoid over the
fraction in [0, 1], in the score's units (cosine). Deletion: lower AUC is better; insertion: higher.

Images (a feature = one pixel, all channels):

* deletion replaces pixels with ``fill``; default ``"black"``: pixel value 0 mapped through the
  model's normalisation, ``(0 - mean) / std`` per channel (InputIBA deletes to black); ``"mean"``
  is 0 in normalised space (the dataset mean colour); a float / per-channel sequence is used as given
  (normalised space). ``mean`` / ``std`` default to OpenAI CLIP's (``open_clip.constants``).
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
"""
from __future__ import annotations

from typing import Callable, Sequence

import torch
from open_clip.constants import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD
from torch import Tensor
from torchvision.transforms.v2.functional import gaussian_blur

from clipib.metrics._base import SampleMeanMetric
from clipib.metrics.text_localization import content_positions

__all__ = [
    "blur_params",
    "blurred_canvas",
    "deletion_fill",
    "image_insertion_deletion",
    "text_insertion_deletion",
    "InsertionDeletion",
]

_MODES = ("deletion", "insertion")


def blur_params(height: int, width: int) -> tuple[list[int], list[float]]:
    """InputIBA's blur (kernel 29, sigma 15 at 224 px) scaled to ``height x width``: ``([kx, ky], [sx, sy])``.

    Example:
        >>> blur_params(224, 224), blur_params(32, 64)
        (([29, 29], [15.0, 15.0]), ([9, 5], [4.285714285714286, 2.142857142857143]))
    """
    def kernel(size: int) -> int:  # the radius (14 at 224 px) scales; kernel = 2 * radius + 1
        return 2 * max(1, round(14 * size / 224)) + 1

    return [kernel(width), kernel(height)], [15.0 * width / 224, 15.0 * height / 224]


def blurred_canvas(images: Tensor) -> Tensor:
    """Gaussian-blurred copy of ``images [B, C, H, W]`` with :func:`blur_params` (reflect padding)."""
    h, w = images.shape[-2:]
    k, s = blur_params(h, w)
    k = [min(k[0], 2 * w - 1), min(k[1], 2 * h - 1)]  # reflect padding needs k // 2 < size
    return gaussian_blur(images, kernel_size=k, sigma=s)


def deletion_fill(
    fill: str | float | Sequence[float] = "black",
    channels: int = 3,
    mean: Sequence[float] = OPENAI_DATASET_MEAN,
    std: Sequence[float] = OPENAI_DATASET_STD,
) -> Tensor:
    """Per-channel fill value ``[C, 1, 1]`` in normalised space (see the module docstring).

    Example:
        >>> deletion_fill("black", mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25)).flatten()
        tensor([-2., -2., -2.])
    """
    if fill == "black":
        v = [-m / s for m, s in zip(mean, std)]
    elif fill == "mean":
        v = [0.0] * channels
    elif isinstance(fill, str):
        raise ValueError(f"fill must be 'black', 'mean', a float or per-channel values, got {fill!r}")
    else:
        v = [float(fill)] * channels if isinstance(fill, (int, float)) else [float(x) for x in fill]
    if len(v) != channels:
        raise ValueError(f"fill has {len(v)} channels, images have {channels}")
    return torch.tensor(v, dtype=torch.float32)[:, None, None]


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
    mean: Sequence[float] = OPENAI_DATASET_MEAN,
    std: Sequence[float] = OPENAI_DATASET_STD,
) -> tuple[Tensor, Tensor, Tensor]:
    """Image deletion / insertion curve (InputIBA App. D.3): ``(auc [B], fractions [S+1], curves [B, S+1])``.

    Args:
        images: ``[B, C, H, W]`` normalised model inputs.
        maps: ``[B, H, W]`` attribution maps (only the order matters).
        score_fn: ``images [B, C, H, W] -> [B]``, e.g. :func:`clipib.metrics.scoring.image_scorer`.
        mode: ``"deletion"`` (to ``fill``) or ``"insertion"`` (onto the blurred canvas).
        steps: number of equal batches of pixels.
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
) -> tuple[Tensor, Tensor, Tensor]:
    """Token deletion / insertion curve: ``(auc [B], fractions [S+1], curves [B, S+1])``.

    Args:
        ids: ``[B, L]`` token ids; scores: ``[B, L]`` token attributions.
        score_fn: ``ids [B, L] -> [B]``, e.g. :func:`clipib.metrics.scoring.text_scorer`.
        replacement_id: the token put in place of a removed token (default 0, see module docstring).
        eot: EOT positions ``[B]`` (default ``ids.argmax(-1)``, open_clip's rule).
    """
    _check_mode(mode, steps)
    if scores.shape != ids.shape:
        raise ValueError(f"scores {tuple(scores.shape)} and ids {tuple(ids.shape)} differ in shape")
    content = content_positions(ids, eot)  # [B, L]
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


class InsertionDeletion(SampleMeanMetric):
    """Mean insertion or deletion AUC (InputIBA App. D.3) for images or text, with the mean curve.

    ``update`` computes the curves with ``score_fn`` (which holds the other modality);
    ``compute()`` is the mean AUC, ``compute_curves()`` the mean curve ``(fractions, scores)`` for plots.
    Higher is better for insertion, lower for deletion (``higher_is_better`` is ``None``: it depends
    on ``mode``).

    Example:
        >>> metric = InsertionDeletion(modality="image", mode="deletion", steps=4, fill="mean")
        >>> images = torch.ones(1, 3, 2, 2)
        >>> maps = torch.tensor([[[1.0, 0.0], [0.0, 0.0]]])
        >>> metric.update(images, maps, lambda x: x.mean(dim=(1, 2, 3)))
        >>> metric.compute()
        tensor(0.5000, dtype=torch.float64)
        >>> metric.compute_curves()[1]
        tensor([1.0000, 0.7500, 0.5000, 0.2500, 0.0000], dtype=torch.float64)
    """

    higher_is_better = None
    curve_sum: Tensor

    def __init__(
        self,
        modality: str = "image",
        mode: str = "deletion",
        steps: int = 20,
        fill: str | float | Sequence[float] = "black",
        replacement_id: int = 0,
        mean: Sequence[float] = OPENAI_DATASET_MEAN,
        std: Sequence[float] = OPENAI_DATASET_STD,
        **kwargs,
    ) -> None:
        super().__init__(**kwargs)
        _check_mode(mode, steps)
        if modality not in ("image", "text"):
            raise ValueError(f"modality must be 'image' or 'text', got {modality!r}")
        self.modality, self.mode, self.steps = modality, mode, steps
        self.fill, self.replacement_id = fill, replacement_id
        self.mean, self.std = tuple(mean), tuple(std)
        self.add_state("curve_sum", default=torch.zeros(steps + 1, dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, inputs: Tensor, attributions: Tensor, score_fn: Callable[[Tensor], Tensor],
               eot: Tensor | None = None) -> None:
        """Image: ``inputs [B, C, H, W]``, ``attributions [B, H, W]``; text: ``ids [B, L]``, ``scores [B, L]``.

        ``score_fn`` maps perturbed inputs to ``[B]`` cosines (:mod:`clipib.metrics.scoring`);
        ``eot`` (text only) overrides the EOT positions.
        """
        auc, _, curves = self.curves(inputs, attributions, score_fn, eot)
        self._accumulate_curves(auc, curves)

    def curves(self, inputs: Tensor, attributions: Tensor, score_fn: Callable[[Tensor], Tensor],
               eot: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
        """The per-sample ``(auc, fractions, curves)`` without accumulating (for per-sample records)."""
        if self.modality == "image":
            return image_insertion_deletion(inputs, attributions, score_fn, self.mode, self.steps,
                                            self.fill, self.mean, self.std)
        return text_insertion_deletion(inputs, attributions, score_fn, self.mode, self.steps,
                                       self.replacement_id, eot)

    def _accumulate_curves(self, auc: Tensor, curves: Tensor) -> None:
        self._accumulate(auc)
        self.curve_sum += curves.double().sum(0)

    def compute_curves(self) -> tuple[Tensor, Tensor]:
        """``(fractions [S+1], mean curve [S+1])`` over all scored samples on all processes."""
        fractions = torch.linspace(0.0, 1.0, self.steps + 1, dtype=torch.float64, device=self.curve_sum.device)
        with self.synced():
            return fractions, self.curve_sum / self.count
