"""Sanity checks: do the maps depend on the model's weights (Adebayo et al. 2018, "Sanity Checks for Saliency
Maps"; M2IB Sec. 4.5 / Fig. 4; Quantus' MPRT) and on the explained target (Quantus' RandomLogit)?

:class:`ModelRandomisation` randomises the attributed tower of a copy of the model cascading from the top: the
projection into the shared space first, then the blocks from the last to the first, and re-computes the
method's maps on the copy after each step; :class:`OtherTarget` explains each image against an unrelated
caption (each caption against a noise image) and compares with the pair's own map. A method that passes
shows low similarity (``rho_abs``, ``rho``, ``ssim``, ``topk`` of :func:`~clipib.metrics.map_similarity.compare`).
The user's model is never changed: the randomisation works on :meth:`SplitCLIP.copy` and the method is rebuilt
on it (:meth:`Attributor.rebuild`).
"""
from __future__ import annotations

import zlib
from typing import Any, Dict, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn

from clipib.attribution.base import Attribution, Attributor
from clipib.metrics.base import AttributionMetric, Batch
from clipib.metrics.map_similarity import STATS, compare, pair_seeds, rerun
from clipib.models.split import SplitCLIP

__all__ = ["reinitialise_", "randomise_tower_", "other_captions", "noise_images", "ModelRandomisation", "OtherTarget",
           "UNRELATED"]


@torch.no_grad()
def reinitialise_(params: Sequence[Tuple[str, nn.Parameter]], seed: int) -> None:
    """Re-draw ``params`` (``(name, parameter)`` pairs) in place, deterministically from ``seed``.

    Matrices (``ndim >= 2``): U(−1/√n, 1/√n) with ``n`` the last dimension (PyTorch's ``nn.Linear`` rule);
    1-D ``…bias`` parameters: 0; other 1-D parameters (LayerNorm and layer-scale weights): 1 — PyTorch's
    ``reset_parameters`` outcome for normalisations, which Quantus' MPRT calls. Drawn on the CPU from one
    generator, so the randomised weights are the same on every device.

    >>> p = nn.Parameter(torch.zeros(2, 4)); reinitialise_([("w", p)], seed=0); bool(p.abs().max() <= 0.5)
    True
    """
    gen = torch.Generator().manual_seed(int(seed))
    for name, p in params:
        if p.ndim >= 2:
            bound = p.shape[-1] ** -0.5
            new = (torch.rand(p.shape, generator=gen, dtype=torch.float64) * 2 - 1) * bound
        elif name.endswith("bias"):
            new = torch.zeros(p.shape)
        else:
            new = torch.ones(p.shape)
        p.copy_(new.to(p.device, p.dtype))


def _part_seed(seed: int, modality: str, part: int) -> int:
    """The seed of one randomised part (``-1``: the projection; ``i``: block ``i``) of a tower."""
    return zlib.crc32(f"{seed}:{modality}:{part}".encode()) & 0x7FFFFFFF


def randomise_tower_(clip: SplitCLIP, modality: str, n_blocks: int, seed: int, done: int = -1) -> int:
    """Randomise ``clip``'s ``modality`` tower in place: the projection and the last ``n_blocks`` blocks.

    ``done`` is how many top blocks an earlier call already randomised (``-1``: not even the projection), so a
    cascade costs each part once; returns the new ``done``. Each part draws from its own seed, so the weights
    after a step do not depend on which steps came before.
    """
    tower = getattr(clip, modality)
    if not 0 <= n_blocks <= tower.n_layers:
        raise ValueError(f"n_blocks={n_blocks} outside 0..{tower.n_layers}")
    if done < 0:
        reinitialise_([(f"proj{i}", p) for i, p in enumerate(tower.projection_parameters())],
                      _part_seed(seed, modality, -1))
        done = 0
    for k in range(done, n_blocks):
        i = tower.n_layers - 1 - k
        reinitialise_(list(tower.blocks[i].named_parameters()), _part_seed(seed, modality, i))
    return max(done, n_blocks)


class ModelRandomisation(AttributionMetric):
    """Cascading model randomisation (Adebayo et al. 2018; M2IB Sec. 4.5): per step, how alike the maps stay.

    Values ``<modality>_mprt_<stat>_<pct>``: ``stat`` in ``rho_abs``, ``rho``, ``ssim``, ``topk`` (image) and
    ``rho_abs``, ``rho`` (text) — :func:`~clipib.metrics.map_similarity.compare` of the maps on the randomised
    copy against the original maps — and ``pct`` = ``round(100·f)`` for each of ``fractions``: the projection
    plus the last ``round(f · n_layers)`` blocks of the attributed tower randomised (``000``: the projection
    alone; ``100``: every block; embeddings and the final LayerNorm stay). Lower = the method depends more
    on the weights (passes). Cost per pair: ``len(fractions)`` method runs (+1 for text), one model copy per batch.

    Args:
        fractions: the cascade's steps as shares of the tower's blocks (0 ≤ f ≤ 1).
        seed: the randomisation seed (:func:`reinitialise_`).
        topk: share of the grid cells the top-k intersection keeps.
        chunk: most pairs per method call (None: the batch).

    Example (the random baseline does not depend on the weights):
        >>> import clipib
        >>> clip = clipib.load_clip("clipib-shapes")
        >>> method = clipib.METHODS["random"](clip)
        >>> images, ids = torch.zeros(2, 3, *clip.image_size), clip.tokenize(["a dog", "a cat"])
        >>> attr = method.attribute(images, ids, "image", seeds=[1, 2])
        >>> metric = ModelRandomisation(fractions=(0.0, 1.0))
        >>> v = metric.update(clip, {"image": images, "ids": ids}, attr, "image", method=method, seeds=[1, 2])
        >>> v["image_mprt_rho_100"]
        tensor([1., 1.], dtype=torch.float64)
    """

    needs_method = True
    higher_is_better = False

    def __init__(self, fractions: Sequence[float] = (0.0, 0.25, 0.5, 0.75, 1.0), seed: int = 0, topk: float = 0.1,
                 chunk: Optional[int] = None, **kwargs: Any) -> None:
        fractions = sorted({float(f) for f in fractions})
        if not fractions or not all(0.0 <= f <= 1.0 for f in fractions):
            raise ValueError(f"fractions must be in [0, 1], got {fractions}")
        self.labels = {f: f"{round(100 * f):03d}" for f in fractions}
        object.__setattr__(self, "VALUES", {mod: tuple(f"{mod}_mprt_{s}_{lab}" for lab in self.labels.values()
                                                       for s in STATS[mod]) for mod in STATS})
        super().__init__(**kwargs)
        self.fractions, self.seed, self.topk, self.chunk = fractions, seed, topk, chunk

    def score(self, clip: SplitCLIP, batch: Batch, attr: Attribution, modality: str,
              method: Attributor = None, seeds: Optional[Sequence[int]] = None) -> Dict[str, Tensor]:
        images, ids = batch["image"], batch["ids"]
        ref = reference(method, attr, images, ids, modality, seeds, self.chunk)
        copy = clip.copy()
        twin = method.rebuild(copy)
        out: Dict[str, Tensor] = {}
        done = -1
        for f in self.fractions:
            done = randomise_tower_(copy, modality, round(f * getattr(clip, modality).n_layers), self.seed, done)
            stats = compare(clip, ref, rerun(twin, images, ids, modality, seeds, self.chunk), ids, modality, self.topk)
            out.update({f"{modality}_mprt_{s}_{self.labels[f]}": v for s, v in stats.items()})
        return out


def reference(method: Attributor, attr: Attribution, images: Tensor, ids: Tensor, modality: str,
              seeds: Optional[Sequence[int]], chunk: Optional[int]) -> Attribution:
    """The maps a re-run of ``modality`` is compared with: ``attr`` for the image (drawn first, DESIGN.md §3, so
    ``attr``'s image map is what a re-run gives), a re-run for the text (whose noise stream follows the image's
    when ``attr`` was computed with ``modality="both"``)."""
    if modality == "image":
        return attr
    return rerun(method, images, ids, modality, seeds, chunk)


UNRELATED = ("a photo of a cat", "a page of printed text", "a city street at night", "a bowl of soup")
"""Default captions :class:`OtherTarget` explains images against (unrelated to most evaluation data)."""


def other_captions(pool: Tensor, ids: Tensor, seeds: Sequence[int]) -> Tuple[Tensor, Tensor]:
    """For each pair, a caption of ``pool [K, ctx]`` other than its own ``ids [B, ctx]``, chosen by its seed:
    ``(ids [B, ctx], found [B])`` — row ``seed % K``, or the next row when that one is the pair's own caption;
    ``found`` is False when no other row exists.

    >>> other_captions(torch.tensor([[1], [2]]), torch.tensor([[1], [1], [2]]), [0, 1, 1])
    (tensor([[2],
            [2],
            [1]]), tensor([True, True, True]))
    """
    k = pool.shape[0]
    pick = torch.tensor([int(s) % k for s in seeds], device=ids.device)  # [B]
    pick = torch.where((pool[pick] == ids).all(1), (pick + 1) % k, pick)
    return pool[pick], ~(pool[pick] == ids).all(1)


def noise_images(shape: Sequence[int], seeds: Sequence[int], normalization: Tuple[Sequence[float], Sequence[float]],
                 device: torch.device) -> Tensor:
    """Uniform-noise images ``[B, C, H, W]`` (pixels U(0, 1), then the model's normalisation), one per seed."""
    mean, std = (torch.tensor(v, dtype=torch.float32)[:, None, None] for v in normalization)
    pixels = torch.stack([torch.rand(tuple(shape[1:]), generator=torch.Generator().manual_seed(int(s))) for s in seeds])
    return ((pixels - mean) / std).to(device)


class OtherTarget(AttributionMetric):
    """Explain against an unrelated target (Quantus' RandomLogit for image-text pairs): how alike the maps stay.

    Each image is explained against an unrelated caption (one of ``captions``, picked by the pair's seed, never
    the pair's own) and each caption against a uniform-noise image drawn from the pair's seed; the maps are
    compared with the pair's own (values ``<modality>_rl_<stat>``,
    :func:`~clipib.metrics.map_similarity.compare`). Lower = the map depends more on the target (passes). The
    target depends on the pair alone, not on the batch, so records do not depend on batch size or process count.
    Cost per pair: 1 method run (2 for text).

    Args:
        captions: the unrelated captions (default :data:`UNRELATED`); at least 2 so one differs from any pair's.
        topk: share of the grid cells the top-k intersection keeps.
        chunk: most pairs per method call (None: the batch).
    """

    needs_method = True
    higher_is_better = False
    VALUES = {mod: tuple(f"{mod}_rl_{s}" for s in STATS[mod]) for mod in STATS}

    def __init__(self, captions: Sequence[str] = UNRELATED, topk: float = 0.1, chunk: Optional[int] = None,
                 **kwargs: Any) -> None:
        super().__init__(**kwargs)
        if len(captions) < 2:
            raise ValueError(f"captions needs at least 2 entries, got {len(captions)}")
        self.captions, self.topk, self.chunk = list(captions), topk, chunk

    def score(self, clip: SplitCLIP, batch: Batch, attr: Attribution, modality: str,
              method: Attributor = None, seeds: Optional[Sequence[int]] = None) -> Dict[str, Tensor]:
        images, ids = batch["image"], batch["ids"]
        own = pair_seeds(method, seeds, images.shape[0])
        ref = reference(method, attr, images, ids, modality, seeds, self.chunk)
        found = torch.ones(images.shape[0], dtype=torch.bool, device=images.device)
        if modality == "image":
            other_ids, found = other_captions(clip.tokenize(self.captions).to(ids.device), ids, own)
            other = rerun(method, images, other_ids, modality, own, self.chunk)
        else:
            other = rerun(method, noise_images(images.shape, own, clip.normalization, images.device), ids, modality,
                          own, self.chunk)
        nan = torch.tensor(float("nan"), dtype=torch.float64, device=images.device)
        return {f"{modality}_rl_{s}": torch.where(found, v.to(torch.float64), nan)
                for s, v in compare(clip, ref, other, ids, modality, self.topk).items()}
