"""Perturbation curves without retraining: MoRF / LeRF region flipping, their AUCs and ABPC.

Image features are the model's **patches** (the grid comes from the model, ``clip.grid``), ranked by the
method's patch scores ``attr.image_grid`` (raw, sign kept; ties in index order). MoRF removes the most relevant
patches first, LeRF the least relevant first (Samek et al. 2017, region perturbation); the curve is the cosine
of the perturbed image with the clean caption at removal fractions ``0, 1/S, ..., 1`` (``steps=None``: one
patch per step, Samek's region flipping; else ``S = steps`` equal fractions, ``round(f * n)`` patches).
AUC = trapezoid over the fraction in [0, 1] (cosine units). **ABPC** = AUC(LeRF) - AUC(MoRF) (Schulz et al.
2020's area between perturbation curves): higher is better; MoRF AUC: lower is better; LeRF AUC: higher.

What a removed patch becomes (``fill``):

* ``"road"`` (default) - ROAD's noisy linear imputation (Rong et al. 2022, "A Consistent and Efficient
  Evaluation Strategy for Attribution Methods"): each removed pixel is the weighted mean of its 8 neighbours
  (weight 1/6 direct, 1/12 diagonal, in-image neighbours only), known pixels fixed, plus Gaussian noise of std
  ``noise`` (0.01, ROAD's default, in the model's input space). ROAD solves the sparse linear system exactly;
  clipib solves it with ``road_iters`` (30) conjugate-gradient steps from a coarse-to-fine masked-mean start,
  batched on the device (the exact solve is a per-image sparse factorisation on the CPU); on a 32 x 32 px hole
  in white noise 30 steps leave a max error of 0.08 (input units, vs 1e-6 at 2,000 steps), 50 steps 0.007. The noise of copy (pair, step) is
  drawn from a generator seeded by the pair's key (:func:`~clipib.metrics.base.key_generators`), so values do
  not depend on the batch or the process count.
* ``"blur"`` - InputIBA's blurred canvas (:func:`~clipib.removal.blurred_canvas`).
* ``"black"`` / ``"mean"`` / a number - :func:`~clipib.removal.deletion_fill`.

Text: features are the content tokens (strictly between SOT and EOT, ranked by ``attr.text_raw``), removed by
replacing them with ``replacement_id`` (default 0: open_clip's padding id, ``"!"`` in CLIP's BPE, the blank
token of M2IB's Table 1); the text is pooled at the original EOT. Each caption has ``steps`` (default: its
number of content tokens) steps.

Copies are scored in chunks of ``chunk`` perturbed inputs, all on the input's device. **Cost**: ``2 (S + 1)``
forward passes of one tower per pair (S = number of patches / tokens by default). A constant score map has no
order: NaN, counted as skipped. :class:`PerturbationCurves` is the eval metric (registry ``perturbation``).
"""
from __future__ import annotations

import math
from typing import Any, Callable, Dict, List, Optional, Sequence

import torch
from torch import Tensor

from clipib.attribution.base import Attribution
from clipib.attribution.common import cosine, patch_feature_mask
from clipib.metrics.base import AttributionMetric, Batch, key_generators
from clipib.metrics.insertion_deletion import _ranks
from clipib.models.split import SplitCLIP
from clipib.removal import deletion_fill, image_fill, road_impute  # noqa: F401  (the kernels live in clipib.removal)

__all__ = ["road_impute", "image_fill", "chunked_scores", "copy_noise", "remove_pixels", "image_perturbation_curves", "text_perturbation_curves",
           "pair_scorers", "PerturbationCurves"]

RowScore = Callable[[Tensor, Tensor], Tensor]
"""``(inputs [M, ...], rows [M]) -> [M]``: the cosine of each perturbed input with the clean other modality of
its pair ``rows`` (an index into the batch)."""

def chunked_scores(n_rows: int, n_copies: int, make: Callable[[Tensor, Tensor], Tensor], score: RowScore,
                   chunk: int) -> Tensor:
    """``[B, K]`` scores of ``K`` copies per pair, built and scored ``chunk`` copies at a time.

    ``make(rows [M], copies [M]) -> inputs [M, ...]`` builds the perturbed inputs of (pair, copy) indices; the
    indices are CPU tensors (bookkeeping only: no data crosses devices), ``make`` moves them where it needs.
    """
    if chunk < 1:
        raise ValueError(f"chunk must be >= 1, got {chunk}")
    out = []
    with torch.no_grad():
        for part in torch.arange(n_rows * n_copies).split(chunk):
            rows, copies = part // n_copies, part % n_copies
            out.append(score(make(rows, copies), rows).double())
    return torch.cat(out).view(n_rows, n_copies)


def copy_noise(seeds: Sequence[int], rows: Tensor, copies: Tensor, shape: Sequence[int], std: float,
               like: Tensor) -> Tensor:
    """Gaussian noise ``[M, *shape]`` of std ``std`` for CPU indices (pair ``rows``, ``copies``): copy ``c`` of pair
    ``r`` draws from a CPU generator seeded ``seeds[r] * 1_000_003 + c``, whatever chunk it is in."""
    draws = [torch.randn(*shape, generator=torch.Generator().manual_seed((seeds[r] * 1_000_003 + c) % 2**63))
             for r, c in zip(rows.tolist(), copies.tolist())]
    return (torch.stack(draws) * std).to(like)


def remove_pixels(images: Tensor, canvas: Optional[Tensor], gone: Tensor, rows: Tensor, copies: Tensor,
                  seeds: Optional[Sequence[int]], noise: float, iters: int) -> Tensor:
    """``images[rows]`` with the ``gone [M, 1, H, W]`` pixels replaced by ``canvas`` (:func:`image_fill`), or
    ROAD-imputed (:func:`road_impute`, noise of copy ``copies`` from :func:`copy_noise`) when ``canvas`` is None."""
    r = rows.to(images.device)
    x = images[r]
    if canvas is None:
        eps = copy_noise(seeds, rows, copies, x.shape[1:], noise, x) if noise > 0 else 0.0
        return road_impute(x, gone, eps, iters)
    return torch.where(gone, canvas[r] if canvas.ndim == 4 else canvas, x)


def _removal_counts(n: Tensor, s: int, like: Tensor) -> tuple[Tensor, Tensor]:
    """``(fractions [B, S+1], counts [B, S+1])``: features removed at ``s`` equal steps for ``n [B]`` features."""
    if s < 1:
        raise ValueError(f"steps must be >= 1, got {s}")
    frac = torch.linspace(0.0, 1.0, s + 1, dtype=torch.float64, device=like.device)[None].expand(n.shape[0], -1)
    return frac, torch.round(frac * n.double()[:, None])


def image_perturbation_curves(
    images: Tensor, scores: Tensor, patches: Tensor, score: RowScore, steps: Optional[int] = None,
    fill: str | float | Sequence[float] = "road", chunk: int = 64, mean: Optional[Sequence[float]] = None,
    std: Optional[Sequence[float]] = None, seeds: Optional[Sequence[int]] = None, noise: float = 0.01,
    road_iters: int = 30,
) -> tuple[Tensor, Dict[str, Tensor]]:
    """MoRF and LeRF curves of patch removal: ``(fractions [S+1], {"morf": [B, S+1], "lerf": [B, S+1]})``.

    Args:
        images: ``[B, C, H, W]`` normalised model inputs.
        scores: ``[B, gh, gw]`` patch scores (``attr.image_grid``).
        patches: ``LongTensor[H, W]``, the patch index ``row * gw + col`` of each pixel.
        score: ``(pixels [M, C, H, W], rows [M]) -> [M]`` (:func:`pair_scorers`).
        steps: ``None`` (one patch per step) or the number of equal fractions.
        fill, mean, std: see the module docstring / :func:`image_fill`.
        seeds: one int per pair for ROAD's noise (required when ``fill="road"`` and ``noise > 0``).
        noise, road_iters: ROAD's noise std and the number of conjugate-gradient steps.
    """
    b, c, h, w = images.shape
    flat = scores.reshape(b, -1)  # [B, P]
    n = torch.full((b,), flat.shape[1], device=images.device)
    frac, counts = _removal_counts(n, flat.shape[1] if steps is None else steps, images)
    canvas = image_fill(images, fill, mean, std)
    if fill == "road" and noise > 0 and seeds is None:
        raise ValueError("fill='road' with noise needs one seed per pair")
    pix = patches.to(images.device).reshape(-1)  # [H*W]
    curves = {}
    for order in ("morf", "lerf"):
        rank = _ranks(flat if order == "morf" else -flat)  # [B, P]

        def make(rows: Tensor, copies: Tensor, rank: Tensor = rank) -> Tensor:
            r, k = rows.to(images.device), copies.to(images.device)
            gone = (rank[r] < counts[r, k][:, None])[:, pix].view(-1, 1, h, w)  # [M, 1, H, W]
            stream = copies + (0 if order == "morf" else counts.shape[1])  # LeRF's noise: its own copies
            return remove_pixels(images, canvas, gone, rows, stream, seeds, noise, road_iters)

        curves[order] = chunked_scores(b, counts.shape[1], make, score, chunk)
    return frac[0], curves


def text_perturbation_curves(
    ids: Tensor, scores: Tensor, content: Tensor, score: RowScore, steps: Optional[int] = None,
    replacement_id: int = 0, chunk: int = 64,
) -> tuple[Tensor, Dict[str, Tensor]]:
    """Token MoRF / LeRF curves: ``(fractions [B, S+1], {"morf": [B, S+1], "lerf": [B, S+1]})``.

    ``content [B, L]`` marks the removable tokens; with ``steps=None`` each caption takes one token per step
    (``S`` = the batch's longest content, shorter captions reach 1 earlier and stay there).
    """
    b = ids.shape[0]
    n = content.sum(1)  # [B]
    frac, counts = _removal_counts(n, int(n.max()) if steps is None else steps, ids)  # a shape: one scalar read
    if steps is None:  # one token per step: fraction = removed / n, capped at 1
        counts = torch.minimum(torch.arange(counts.shape[1], device=ids.device)[None].double(), n[:, None].double())
        frac = counts / n.clamp_min(1)[:, None].double()
    curves = {}
    for order in ("morf", "lerf"):
        rank = _ranks(scores.double() if order == "morf" else -scores.double(), content)  # [B, L]

        def make(rows: Tensor, copies: Tensor, rank: Tensor = rank) -> Tensor:
            r, k = rows.to(ids.device), copies.to(ids.device)
            gone = content[r] & (rank[r] < counts[r, k][:, None])  # [M, L]
            return torch.where(gone, torch.full_like(ids[r], replacement_id), ids[r])

        curves[order] = chunked_scores(b, counts.shape[1], make, score, chunk)
    return frac, curves


def pair_scorers(clip: SplitCLIP, images: Tensor, ids: Tensor) -> tuple[RowScore, RowScore]:
    """``(image_score, text_score)``: cosine of perturbed pixels with the clean caption of pair ``rows``, and of
    perturbed ids with the clean image of pair ``rows`` (text pooled at the original EOT), no grad."""
    with torch.no_grad():
        e_txt, e_img = clip.text.encode(ids), clip.image.encode(images)  # [B, E]
    pool_at = clip.text.eot_positions(ids)  # [B]
    length = int(pool_at.max()) + 1

    def image_score(pixels: Tensor, rows: Tensor) -> Tensor:
        r = rows.to(pixels.device)
        return cosine(clip.image.encode(pixels), e_txt[r])

    def text_score(new_ids: Tensor, rows: Tensor) -> Tensor:
        r = rows.to(new_ids.device)
        emb = clip.text.token_embeddings(new_ids[:, :length])  # [M, L, D]
        return cosine(clip.text.encode_embeddings(emb, pool_at[r]), e_img[r])

    return image_score, text_score


def _curve_values(curves: Dict[str, Tensor], fractions: Tensor, ok: Tensor, prefix: str) -> Dict[str, Tensor]:
    """``{prefix}_morf``, ``_lerf``, ``_abpc`` AUCs ``[B]``; NaN where not ``ok``. ``fractions`` ``[B or 1, S+1]``."""
    auc = {k: torch.trapezoid(v, fractions.to(v).expand_as(v), dim=1) for k, v in curves.items()}
    nan = torch.full_like(auc["morf"], math.nan)
    return {f"{prefix}_morf": torch.where(ok, auc["morf"], nan), f"{prefix}_lerf": torch.where(ok, auc["lerf"], nan),
            f"{prefix}_abpc": torch.where(ok, auc["lerf"] - auc["morf"], nan)}


class PerturbationCurves(AttributionMetric):
    """MoRF / LeRF AUCs and ABPC of patch (image) and token (text) removal, scored by the pair's cosine.

    Values ``{m}_morf`` (lower is better), ``{m}_lerf`` (higher is better), ``{m}_abpc`` (= LeRF - MoRF, higher
    is better) for m = image, text. See the module docstring for the definitions and costs.

    Args:
        steps: ``None`` = one patch / token per step (region flipping), else the number of equal fractions.
        fill: ``"road"`` (default), ``"blur"``, ``"black"``, ``"mean"`` or a value (normalised space).
        noise: ROAD's noise std (input space); road_iters: conjugate-gradient steps of the imputation.
        replacement_id: the blank token of text removal (default 0).
        chunk: perturbed copies per model call.
        seed: mixed into each pair's key to seed ROAD's noise.
        n_seeds: number of seeds aggregated.

    Example (the shipped model):
        >>> from clipib import load_clip
        >>> clip = load_clip("clipib-shapes")
        >>> batch = {"image": torch.randn(2, 3, 64, 64), "ids": clip.tokenize(["a dog", "a red cat"]), "key": ["a", "b"]}
        >>> attr = Attribution(image_grid=torch.rand(2, *clip.grid), text_raw=torch.rand(2, 77))
        >>> metric = PerturbationCurves(steps=4, chunk=16)
        >>> sorted(metric.update(clip, batch, attr, "image"))
        ['image_abpc', 'image_lerf', 'image_morf']
    """

    VALUES = {"image": ("image_morf", "image_lerf", "image_abpc"), "text": ("text_morf", "text_lerf", "text_abpc")}
    higher_is_better = None

    def __init__(self, steps: Optional[int] = None, fill: str | float | Sequence[float] = "road", noise: float = 0.01,
                 road_iters: int = 30, replacement_id: int = 0, chunk: int = 64, seed: int = 0,
                 **kwargs: Any) -> None:
        super().__init__(**kwargs)
        if steps is not None and steps < 1:
            raise ValueError(f"steps must be None or >= 1, got {steps}")
        if chunk < 1:
            raise ValueError(f"chunk must be >= 1, got {chunk}")
        if fill not in ("road", "blur"):
            deletion_fill(fill, mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0))  # validate
        self.steps, self.fill, self.noise, self.road_iters = steps, fill, noise, road_iters
        self.replacement_id, self.chunk, self.seed = replacement_id, chunk, seed

    def score(self, clip: SplitCLIP, batch: Batch, attr: Attribution, modality: str) -> Dict[str, Tensor]:
        """``{m}_morf``, ``{m}_lerf``, ``{m}_abpc`` per sample (NaN for a constant score map)."""
        images, ids = batch["image"], batch["ids"]
        image_score, text_score = pair_scorers(clip, images, ids)
        if modality == "image":
            grid = attr.image_grid.flatten(1)  # [B, P]
            seeds = [g.initial_seed() for g in key_generators(batch, self.seed)] if self.fill == "road" else None
            frac, curves = image_perturbation_curves(
                images, attr.image_grid, patch_feature_mask(clip, images.device)[0, 0], image_score, self.steps,
                self.fill, self.chunk, *clip.normalization, seeds=seeds, noise=self.noise, road_iters=self.road_iters)
            ok = grid.amax(1) > grid.amin(1)
            return _curve_values(curves, frac[None], ok, "image")
        content = clip.text.span_mask(ids, special=False)  # [B, ctx]
        raw = attr.text_raw.masked_fill(~content, math.inf)
        ok = content.any(1) & (raw.amin(1) < attr.text_raw.masked_fill(~content, -math.inf).amax(1))
        frac, curves = text_perturbation_curves(ids, attr.text_raw, content, text_score, self.steps,
                                                self.replacement_id, self.chunk)
        return _curve_values(curves, frac, ok, "text")
