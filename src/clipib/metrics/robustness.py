"""Robustness: max- and avg-sensitivity under small input noise (Yeh et al. 2019, "On the (In)fidelity and
Sensitivity of Explanations"; Quantus' MaxSensitivity / AvgSensitivity) and seed stability of stochastic
methods (the mean rank correlation between the maps of different seeds of the same pair).

Sensitivity is image-only: ``attribute(images, ids)`` takes token ids, so there is no small, continuous
perturbation of a caption to make (noise on token embeddings cannot pass through the method's interface).
"""
from __future__ import annotations

from typing import Any, Dict, Optional, Sequence

import torch
from torch import Tensor

from clipib.attribution.base import Attribution, Attributor
from clipib.metrics.base import AttributionMetric, Batch
from clipib.metrics.map_similarity import map_rows, pair_seeds, rerun, spearman
from clipib.models.split import SplitCLIP

__all__ = ["pixel_noise", "relative_change", "Sensitivity", "SeedStability", "NOISES"]

NOISES = ("uniform", "gaussian")


def pixel_noise(shape: Sequence[int], seeds: Sequence[int], sample: int, radius: float, noise: str = "uniform",
                std: Sequence[float] = (1.0, 1.0, 1.0)) -> Tensor:
    """Noise ``[B, C, H, W]`` for preprocessed images: ``radius`` in [0, 1] pixel units, divided by the channel
    ``std`` of the model's normalisation (so ``x + noise`` is the image with ``δ`` added to its pixels).

    ``"uniform"``: δ ~ U(−r, r) (Quantus' ``uniform_noise`` with ``lower_bound = r``); ``"gaussian"``:
    δ ~ N(0, r²). Pair ``i``'s draw ``sample`` comes from a CPU generator seeded by ``(seeds[i], sample)``
    (the same noise on every device and in every batch), then moves to the caller's device.

    >>> pixel_noise((1, 3, 2, 2), [0], 0, radius=0.1).abs().max() <= 0.1
    tensor(True)
    """
    if noise not in NOISES:
        raise ValueError(f"noise must be one of {NOISES}, got {noise!r}")
    draws = []
    for s in seeds:
        gen = torch.Generator().manual_seed((int(s) * 1_000_003 + sample) & 0x7FFFFFFFFFFF)
        if noise == "uniform":
            draws.append((torch.rand(tuple(shape[1:]), generator=gen) * 2 - 1) * radius)
        else:
            draws.append(torch.randn(tuple(shape[1:]), generator=gen) * radius)
    return torch.stack(draws) / torch.tensor(std, dtype=torch.float32)[:, None, None]  # [B, C, H, W]


def relative_change(a: Tensor, b: Tensor, relative: bool = True) -> Tensor:
    """``‖b − a‖ / ‖a‖`` per row of ``a, b [B, N]`` (Quantus' default; ``relative=False``: ``‖b − a‖``,
    Yeh et al.'s), ``[B]``; NaN when ``‖a‖ = 0`` and ``relative``.

    >>> relative_change(torch.tensor([[3.0, 4.0]]), torch.tensor([[3.0, 5.0]]))
    tensor([0.2000])
    """
    diff = (b - a).norm(dim=1)
    if not relative:
        return diff
    den = a.norm(dim=1)
    return torch.where(den > 0, diff / den.clamp_min(torch.finfo(den.dtype).tiny), torch.full_like(den, float("nan")))


class Sensitivity(AttributionMetric):
    """Max- and avg-sensitivity of the image map (Yeh et al. 2019, Quantus' Max/AvgSensitivity).

    For ``samples`` noisy copies of each image (:func:`pixel_noise`, the pair's own seed for the method, so a
    stochastic method's noise stream is unchanged), :func:`relative_change` of the raw grid scores; values
    ``image_max_sens`` (max over the copies) and ``image_avg_sens`` (mean). Lower = more robust. Text: not
    defined (module docstring). Cost per pair: ``samples`` method runs, in chunks of ``chunk`` pairs.

    Args:
        radius: noise radius in [0, 1] pixel units (Quantus' default 0.2 acts on the model's input units; 0.05 of
            the pixel range is small noise for an 8-bit image).
        samples: noisy copies per pair (Quantus' default 200; 10 here, as a cost default).
        noise: ``"uniform"`` (Yeh et al.'s ball, Quantus) or ``"gaussian"``.
        relative: divide by the map's norm (Quantus' default) or not (Yeh et al.'s definition).
        chunk: most pairs per method call (None: the batch).
    """

    needs_method = True
    higher_is_better = False
    VALUES = {"image": ("image_max_sens", "image_avg_sens")}

    def __init__(self, radius: float = 0.05, samples: int = 10, noise: str = "uniform", relative: bool = True,
                 chunk: Optional[int] = None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        if samples < 1 or radius <= 0 or noise not in NOISES:
            raise ValueError(f"need samples >= 1, radius > 0 and noise in {NOISES}; got {samples}, {radius}, {noise!r}")
        self.radius, self.samples, self.noise, self.relative, self.chunk = radius, samples, noise, relative, chunk

    def score(self, clip: SplitCLIP, batch: Batch, attr: Attribution, modality: str,
              method: Attributor = None, seeds: Optional[Sequence[int]] = None) -> Dict[str, Tensor]:
        images, ids = batch["image"], batch["ids"]
        own = pair_seeds(method, seeds, images.shape[0])
        _, std = clip.normalization
        noisy = torch.cat([images + pixel_noise(images.shape, own, j, self.radius, self.noise, std).to(
            images.device, images.dtype) for j in range(self.samples)])  # [S*B, 3, H, W]
        many = rerun(method, noisy, ids.repeat(self.samples, 1), "image", own * self.samples, self.chunk)
        ref = attr.image_grid.flatten(1)  # [B, N]
        grids = many.image_grid.flatten(1).view(self.samples, *ref.shape)  # [S, B, N]
        sens = torch.stack([relative_change(ref, g, self.relative) for g in grids])  # [S, B]
        return {"image_max_sens": sens.amax(0), "image_avg_sens": sens.mean(0)}


class SeedStability(AttributionMetric):
    """Mean Spearman correlation between the maps of ``n_maps`` seeds of the same pair (stochastic methods:
    M2IB, AdaIB, RISE, random, ...): values ``<modality>_seed_rho`` (signed raw scores, patch grid or SOT..EOT
    tokens). Higher = more stable; a deterministic method scores 1. Pair seed ``s`` is joined by
    ``s + 1, …, s + n_maps − 1``. Cost per pair: ``n_maps − 1`` method runs for the image, ``n_maps`` for text.

    Args:
        n_maps: maps per pair (≥ 2); the mean is over its ``n_maps·(n_maps − 1)/2`` pairs.
        chunk: most pairs per method call (None: the batch).
    """

    needs_method = True
    higher_is_better = True
    VALUES = {"image": ("image_seed_rho",), "text": ("text_seed_rho",)}

    def __init__(self, n_maps: int = 3, chunk: Optional[int] = None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        if n_maps < 2:
            raise ValueError(f"n_maps must be >= 2, got {n_maps}")
        self.n_maps, self.chunk = n_maps, chunk

    def score(self, clip: SplitCLIP, batch: Batch, attr: Attribution, modality: str,
              method: Attributor = None, seeds: Optional[Sequence[int]] = None) -> Dict[str, Tensor]:
        images, ids = batch["image"], batch["ids"]
        base = pair_seeds(method, seeds, images.shape[0])
        first = 1 if modality == "image" else 0  # attr's image map is seed s's (drawn first, DESIGN.md §3)
        maps = [map_rows(clip, attr, ids, modality)[0]] if first else []
        for j in range(first, self.n_maps):
            run = rerun(method, images, ids, modality, [(s + j) & 0x7FFFFFFF for s in base], self.chunk)
            maps.append(map_rows(clip, run, ids, modality)[0])
        valid = map_rows(clip, attr, ids, modality)[1]
        rhos = [spearman(maps[i], maps[k], valid) for i in range(self.n_maps) for k in range(i + 1, self.n_maps)]
        return {f"{modality}_seed_rho": torch.stack(rhos).mean(0)}

