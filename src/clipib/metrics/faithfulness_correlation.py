"""Faithfulness correlation (Bhatt et al. 2020, "Evaluating and aggregating feature-based model explanations").

For each pair, ``n_subsets`` random subsets ``S`` of the features are removed one subset at a time; the value is
the Pearson correlation, over the subsets, between the attribution mass ``sum_{i in S} a_i`` and the similarity
drop ``cos(x) - cos(x with S removed)``. Higher is better (a faithful map's mass predicts the drop); in [-1, 1].

* Image features are the model's patches (``clip.grid``), with the method's patch scores ``attr.image_grid``
  (raw, sign kept, as Bhatt's attributions); a subset is ``round(subset * n_patches)`` patches (at least 1).
  Removal uses the fills of :mod:`clipib.metrics.perturbation`; default ``"black"`` (Bhatt's and Quantus'
  baseline; ``"road"``, ``"blur"``, ``"mean"`` or a value also work).
* Text features are the content tokens (``attr.text_raw``), replaced by ``replacement_id`` (default 0).

Quantus' ``FaithfulnessCorrelation`` (defaults: 100 runs of 224 random pixels) is the same statistic at
pixel granularity; clipib draws patches, as a ViT sees them. Subsets are drawn from a generator seeded by the
pair's key (:func:`~clipib.metrics.base.key_generators`), so a pair's value does not depend on its batch or
the process count. A map whose subset masses do not vary (constant map) or a pair whose drops do not vary has
no correlation: NaN, counted as skipped. **Cost**: ``n_subsets`` forward passes of one tower per pair.

:class:`FaithfulnessCorrelation` is the eval metric (registry ``faithfulness_correlation``; values
``{m}_faith_corr`` for m = image, text).
"""
from __future__ import annotations

import math
from typing import Any, Dict, List, Sequence

import torch
from torch import Tensor

from clipib.attribution.base import Attribution
from clipib.attribution.common import patch_feature_mask
from clipib.metrics.base import AttributionMetric, Batch, key_generators
from clipib.metrics.insertion_deletion import deletion_fill
from clipib.metrics.perturbation import chunked_scores, image_fill, pair_scorers, remove_pixels
from clipib.models.split import SplitCLIP

__all__ = ["pearson_rows", "random_subsets", "faithfulness_correlation", "FaithfulnessCorrelation"]


def pearson_rows(x: Tensor, y: Tensor) -> Tensor:
    """Pearson correlation of each row pair of ``x, y [B, R]`` (float64); NaN where either row is constant.

    Example:
        >>> pearson_rows(torch.tensor([[1.0, 2.0, 3.0], [1.0, 1.0, 1.0]]), torch.tensor([[2.0, 4.0, 7.0], [1.0, 2.0, 3.0]]))
        tensor([0.9934,    nan], dtype=torch.float64)
    """
    x, y = x.double(), y.double()
    xc, yc = x - x.mean(1, keepdim=True), y - y.mean(1, keepdim=True)
    sx, sy = xc.square().sum(1), yc.square().sum(1)
    scale = sx.abs().amax().clamp_min(1e-300), sy.abs().amax().clamp_min(1e-300)
    ok = (sx > 1e-24 * scale[0]) & (sy > 1e-24 * scale[1])
    r = (xc * yc).sum(1) / (sx * sy).clamp_min(1e-300).sqrt()
    return torch.where(ok, r, torch.full_like(r, math.nan))


def random_subsets(gens: List[torch.Generator], valid: Tensor, n_subsets: int, fraction: float) -> Tensor:
    """``BoolTensor[B, R, N]``: per pair ``R`` random subsets of ``max(1, round(fraction * n_valid))`` valid entries.

    Pair ``b`` draws from ``gens[b]`` only (on the CPU; the result is moved to ``valid``'s device).
    """
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"subset must be a fraction in (0, 1], got {fraction}")
    b, n = valid.shape
    u = torch.stack([torch.rand(n_subsets, n, generator=g) for g in gens]).to(valid.device)  # [B, R, N]
    u = u.masked_fill(~valid[:, None], 2.0)  # invalid entries last
    k = (fraction * valid.sum(1).double()).round().clamp_min(1)  # [B]
    rank = u.argsort(-1).argsort(-1)  # [B, R, N]
    return (rank < k[:, None, None]) & valid[:, None]


def faithfulness_correlation(scores: Tensor, subsets: Tensor, clean: Tensor, perturbed: Tensor) -> Tensor:
    """Bhatt et al.'s correlation ``[B]``: ``pearson(sum_S scores, clean - perturbed)`` over the ``R`` subsets.

    Args:
        scores: ``[B, N]`` attributions; subsets: ``BoolTensor[B, R, N]``.
        clean: ``[B]`` the unperturbed score; perturbed: ``[B, R]`` the score with each subset removed.

    Example:
        >>> subsets = torch.tensor([[[True, False, False], [False, True, False], [False, False, True]]])
        >>> r = faithfulness_correlation(torch.tensor([[3.0, 2.0, 1.0]]), subsets, torch.tensor([1.0]),
        ...                              torch.tensor([[0.4, 0.6, 0.8]]))
        >>> round(float(r[0]), 6)
        1.0
    """
    mass = (scores.double()[:, None] * subsets).sum(-1)  # [B, R]
    return pearson_rows(mass, clean.double()[:, None] - perturbed.double())


class FaithfulnessCorrelation(AttributionMetric):
    """Faithfulness correlation (Bhatt et al. 2020) of patch (image) and token (text) attributions.

    Values ``image_faith_corr`` and ``text_faith_corr`` (higher is better).

    Args:
        n_subsets: random subsets per pair (Bhatt / Quantus: 100); each costs one forward pass.
        subset: subset size as a fraction of the patches / content tokens (at least one).
        fill: removal fill (see :mod:`clipib.metrics.perturbation`); noise, road_iters: ROAD's settings.
        replacement_id: the blank token; chunk: perturbed copies per model call; seed: mixed into each pair's key.
        n_seeds: number of seeds aggregated.

    Example (the shipped model):
        >>> from clipib import load_clip
        >>> clip = load_clip("clipib-shapes")
        >>> batch = {"image": torch.randn(2, 3, 64, 64), "ids": clip.tokenize(["a dog", "a red cat"]), "key": ["a", "b"]}
        >>> attr = Attribution(image_grid=torch.rand(2, *clip.grid), text_raw=torch.rand(2, 77))
        >>> metric = FaithfulnessCorrelation(n_subsets=8)
        >>> metric.update(clip, batch, attr, "image")["image_faith_corr"].shape
        torch.Size([2])
    """

    VALUES = {"image": ("image_faith_corr",), "text": ("text_faith_corr",)}
    higher_is_better = True

    def __init__(self, n_subsets: int = 50, subset: float = 0.1, fill: str | float | Sequence[float] = "black",
                 noise: float = 0.01, road_iters: int = 30, replacement_id: int = 0, chunk: int = 64, seed: int = 0,
                 **kwargs: Any) -> None:
        super().__init__(**kwargs)
        if n_subsets < 3:
            raise ValueError(f"n_subsets must be >= 3 for a correlation, got {n_subsets}")
        if not 0.0 < subset <= 1.0:
            raise ValueError(f"subset must be a fraction in (0, 1], got {subset}")
        if fill not in ("road", "blur"):
            deletion_fill(fill, mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0))  # validate
        self.n_subsets, self.subset, self.fill, self.noise, self.road_iters = n_subsets, subset, fill, noise, road_iters
        self.replacement_id, self.chunk, self.seed = replacement_id, chunk, seed

    def score(self, clip: SplitCLIP, batch: Batch, attr: Attribution, modality: str) -> Dict[str, Tensor]:
        """``{m}_faith_corr`` per sample (NaN: constant masses or drops)."""
        images, ids = batch["image"], batch["ids"]
        gens = key_generators(batch, self.seed)
        image_score, text_score = pair_scorers(clip, images, ids)
        rows = torch.arange(ids.shape[0])
        if modality == "image":
            scores = attr.image_grid.flatten(1)  # [B, P]
            subsets = random_subsets(gens, torch.ones_like(scores, dtype=torch.bool), self.n_subsets, self.subset)
            clean = image_score(images, rows)
            perturbed = chunked_scores(ids.shape[0], self.n_subsets, self._image_maker(clip, images, subsets, gens),
                                       image_score, self.chunk)
        else:
            scores = attr.text_raw  # [B, ctx]
            subsets = random_subsets(gens, clip.text.span_mask(ids, special=False), self.n_subsets, self.subset)

            def make(r: Tensor, k: Tensor) -> Tensor:
                r, k = r.to(ids.device), k.to(ids.device)
                return torch.where(subsets[r, k], torch.full_like(ids[r], self.replacement_id), ids[r])

            clean = text_score(ids, rows)
            perturbed = chunked_scores(ids.shape[0], self.n_subsets, make, text_score, self.chunk)
        return {f"{modality}_faith_corr": faithfulness_correlation(scores, subsets, clean, perturbed)}

    def _image_maker(self, clip: SplitCLIP, images: Tensor, subsets: Tensor, gens: List[torch.Generator]) -> Any:
        """``make(rows, copies)``: the images with each copy's subset of patches removed by the fill."""
        h, w = images.shape[-2:]
        pix = patch_feature_mask(clip, images.device).reshape(-1)  # [H*W]
        canvas = image_fill(images, self.fill, *clip.normalization)
        seeds = [g.initial_seed() for g in gens]

        def make(rows: Tensor, copies: Tensor) -> Tensor:
            r, k = rows.to(images.device), copies.to(images.device)
            gone = subsets[r, k][:, pix].view(-1, 1, h, w)  # [M, 1, H, W]
            return remove_pixels(images, canvas, gone, rows, copies, seeds, self.noise, self.road_iters)

        return make
