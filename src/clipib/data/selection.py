"""Row selection options: a fixed-seed sample, mismatched pairs, best-of-k captions and the
noisy / borderline / clean partition by CLIP similarity (AdaIB Table 5).

All work on row lists (:mod:`clipib.data.sources.tables`) before any dataset is built, so every rank builds
the same dataset. Rows marked ``skip`` are never sampled, shuffled or scored; they stay in the list
(when no sample is drawn) so they are still reported once.

A *scoring callable* ``score(images, captions) -> Tensor[B]`` gives the CLIP similarity of image
``i`` (preprocessed, ``[B, 3, H, W]``) with caption ``i`` — the cosine of the two embeddings. The
caller supplies it (:meth:`clipib.data.EvalDataModule.use_model` hands :func:`clip_scorer` of the loaded
model); this module never loads a model.
"""

from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch
from torch.utils.data import DataLoader

from clipib.data.common import PairDataset, Preprocess, Row, Score, is_skip
PARTS = ("noisy", "borderline", "clean")


def sample_positions(n_usable: int, n: int, seed: int) -> List[int]:
    """``n`` of the positions ``0 .. n_usable - 1`` drawn without replacement by ``random.Random(seed)``, sorted.

    Only the count is needed, not the rows, so a source too large to hold (LAION shards) draws its sample from
    its usable-row count; ``n`` at least ``n_usable`` keeps every position. Drawing from ``range(n_usable)``
    picks the same positions as drawing from a list of ``n_usable`` rows (``random.sample`` draws indices).
    """
    if n <= 0:
        raise ValueError(f"sample must be positive, got {n}")
    return sorted(random.Random(seed).sample(range(n_usable), n)) if n < n_usable else list(range(n_usable))


def sample_rows(rows: Sequence[Row], n: int, seed: int) -> List[Row]:
    """``n`` usable rows drawn without replacement by ``random.Random(seed)``, in file order.

    The same (rows, n, seed) always gives the same sample, whatever the machine or process count
    (M2IB draws 500 CC3M rows without a seed; this is the reproducible version). ``n`` at least
    the number of usable rows keeps them all.
    """
    usable = [i for i, row in enumerate(rows) if "skip" not in row]
    return [rows[usable[j]] for j in sample_positions(len(usable), n, seed)]


def draw_seed(base: int, run_seed: int) -> int:
    """The seed of one run seed's draw, from a base seed (``sample_seed`` / ``mismatch_seed``) and the run seed.

    The first 63 bits of ``sha256("<base>:<run seed>")``: stable across machines and Python versions, and
    distinct run seeds give unrelated draws.
    """
    return int.from_bytes(hashlib.sha256(f"{base}:{run_seed}".encode()).digest()[:8], "big") >> 1


@dataclass(frozen=True)
class Draw:
    """One draw of pairs: the run seed it serves (``None``: every run seed) and its sample / mismatch seeds."""

    run_seed: Optional[int]
    sample_seed: int
    mismatch_seed: int


def plan_draws(sample: Optional[int], resample: bool, sample_seed: int, mismatch_seed: int,
               run_seeds: Optional[Sequence[int]]) -> List[Draw]:
    """The draws of a selection: one per run seed when a sample is drawn anew for each run, else one for all.

    AdaIB App. A.2 samples a new 2,000 pairs of CC3M / LAION for each of its 5 runs (seeds 42-46), so the
    std over runs includes the sampling spread; ``resample=False`` (or no ``sample``, or run seeds not known)
    is one draw shared by every run seed, whose std is then the methods' own noise only.
    """
    if sample and resample and run_seeds:
        return [Draw(int(s), draw_seed(sample_seed, int(s)), draw_seed(mismatch_seed, int(s)))
                for s in dict.fromkeys(run_seeds)]
    return [Draw(None, sample_seed, mismatch_seed)]


def merge_draws(draws: Sequence[Draw], groups: Sequence[Sequence[Row]]) -> List[Row]:
    """One row list from the rows of each draw: each key once, with ``"run_seeds"`` = the run seeds whose
    draw holds it (a single shared draw: its rows as they are, no ``"run_seeds"``).

    Order: the first draw's rows, then each later draw's new rows, each in its own order.
    """
    if len(draws) == 1 and draws[0].run_seed is None:
        return list(groups[0])
    merged: Dict[str, Row] = {}
    for draw, group in zip(draws, groups):
        for row in group:
            if row["key"] not in merged:
                merged[row["key"]] = {**row, "run_seeds": []}
            if draw.run_seed not in merged[row["key"]]["run_seeds"]:
                merged[row["key"]]["run_seeds"].append(draw.run_seed)
    return list(merged.values())


def mismatch_permutation(n: int, seed: int) -> List[int]:
    """A permutation of ``range(n)`` without fixed points: one random cycle (Sattolo, ``random.Random(seed)``).

    Position ``i`` takes the caption of position ``perm[i]``.
    """
    if n < 2:
        raise ValueError("mismatched pairs need at least 2 usable rows")
    perm = list(range(n))
    rng = random.Random(seed)
    for i in range(n - 1, 0, -1):
        j = rng.randrange(i)  # j < i: Sattolo, a single cycle
        perm[i], perm[j] = perm[j], perm[i]
    return perm


def mismatch_rows(rows: Sequence[Row], seed: int) -> List[Row]:
    """Give every usable row another row's caption (``matched=False``): no row keeps its own.

    The permutation is one random cycle (Sattolo's algorithm, ``random.Random(seed)``), so it has
    no fixed point by construction. Keys become ``"<image key>|<caption key>"``.
    """
    usable = [i for i, row in enumerate(rows) if "skip" not in row]
    perm = mismatch_permutation(len(usable), seed)
    out = list(rows)
    for dst, src in enumerate(perm):
        row, other = rows[usable[dst]], rows[usable[src]]
        out[usable[dst]] = {**row, "caption": other["caption"], "key": f"{row['key']}|{other['key']}", "matched": False}
        out[usable[dst]].pop("candidates", None)
    return out


def apply_mismatch(rows: Sequence[Row], mismatched: Any, seed: int) -> List[Row]:
    """``mismatched`` applied to one draw's rows: ``False`` as they are, ``True`` every caption shuffled
    (:func:`mismatch_rows`), ``"both"`` the rows as they are plus their shuffled copies (AdaIB App. C)."""
    if mismatched == "both":
        return list(rows) + [r for r in mismatch_rows(rows, seed) if "skip" not in r]
    return mismatch_rows(rows, seed) if mismatched else list(rows)


def finish_draws(
    draws: Sequence[Draw], picks: Sequence[Sequence[Row]], mismatched: Any, partition: Optional[str],
    thresholds: Optional[Tuple[float, float]], score: Callable[[List[Row]], List[Optional[List[float]]]],
) -> Tuple[List[Row], Any]:
    """Mismatch and partition each draw's picked rows, then merge the draws (:func:`merge_draws`).

    ``score(rows)`` gives each row's similarity list (:func:`score_rows`' shape); it is called once, on the
    distinct rows of all draws, and only when ``partition`` is set. Each draw's partition bounds are its own
    rows' terciles (or ``thresholds``). Returns the rows and the bounds (one pair, or ``{run seed: pair}``).
    """
    groups = [apply_mismatch(rows, mismatched, d.mismatch_seed) for d, rows in zip(draws, picks)]
    if not partition:
        return merge_draws(draws, groups), None
    unique: Dict[str, Row] = {}
    for group in groups:
        for row in group:
            unique.setdefault(row["key"], row)
    scores = score(list(unique.values()))
    sims = {k: (s[0] if s else None) for k, s in zip(unique, scores)}
    bounds: Dict[Optional[int], Tuple[float, float]] = {}
    for i, (draw, group) in enumerate(zip(draws, groups)):
        group_sims = [sims[r["key"]] for r in group]
        bounds[draw.run_seed] = partition_bounds([x for x in group_sims if x is not None], thresholds)
        groups[i] = partition_rows(group, group_sims, partition, bounds[draw.run_seed])
    return merge_draws(draws, groups), bounds[None] if None in bounds else bounds


def clip_scorer(clip: Any) -> Score:
    """Scoring callable from a :class:`clipib.SplitCLIP`: cosine of each (image, caption) pair.

    Images are moved to the model's device; both towers return L2-normalised embeddings, so the
    cosine is their dot product.
    """

    def score(images: torch.Tensor, captions: List[str]) -> torch.Tensor:
        with torch.no_grad():
            ids = clip.tokenize(captions).to(clip.device)  # [B, ctx]
            img = clip.image.encode(images.to(device=clip.device, dtype=clip.dtype))  # [B, E]
            return (img * clip.text.encode(ids)).sum(-1).float().cpu()  # [B]

    return score


def score_rows(
    rows: Sequence[Row], preprocess: Preprocess, score: Score, batch_size: int = 32, num_workers: int = 0
) -> List[Optional[List[float]]]:
    """Similarity of each row's image with each of its captions (``"candidates"`` or ``[caption]``).

    Returns one list of floats per row, ``None`` for skipped rows and images that fail to load.
    """
    loader = DataLoader(PairDataset(list(rows), preprocess), batch_size=batch_size, num_workers=num_workers, collate_fn=list)
    out: List[Optional[List[float]]] = []
    for items in loader:
        images, captions, owner = [], [], []
        for item in items:
            out.append(None)
            if is_skip(item):
                continue
            row = rows[len(out) - 1]
            for caption in row.get("candidates") or [row["caption"]]:
                images.append(item["image"])
                captions.append(caption)
                owner.append(len(out) - 1)
        sims: List[float] = []
        for start in range(0, len(captions), batch_size):
            chunk = torch.stack(images[start : start + batch_size])  # [b, 3, H, W]
            with torch.no_grad():
                sims += score(chunk, captions[start : start + batch_size]).float().flatten().tolist()
        for index, sim in zip(owner, sims):
            out[index] = (out[index] or []) + [sim]
    return out


def _mark_unscored(row: Row) -> Row:
    return row if "skip" in row else {**row, "skip": "image could not be scored"}


def choose_best_captions(rows: Sequence[Row], scores: Sequence[Optional[List[float]]]) -> List[Row]:
    """Per row, keep the candidate caption most similar to the row's *own* image (first on ties).

    NIB's Flickr8k protocol picks the most similar of the 5 captions, but its code scores them
    against the wrong image (REFERENCE_NOTES §8); here each row is scored with its own image.
    """
    out: List[Row] = []
    for row, sims in zip(rows, scores):
        if sims is None:
            out.append(_mark_unscored(row))
            continue
        best = max(range(len(sims)), key=lambda k: (sims[k], -k))
        out.append({**row, "caption": row.get("candidates", [row["caption"]])[best], "similarity": sims[best]})
    return out


def partition_bounds(scores: Sequence[float], thresholds: Optional[Tuple[float, float]] = None) -> Tuple[float, float]:
    """``(low, high)``: given thresholds, or the terciles of ``scores``.

    AdaIB (App. C, Table 5) splits CC3M / Flickr8k / LAION "manually" by CLIP similarity into noisy
    (low), borderline (medium) and clean (high) without stating thresholds; clipib's default is equal
    thirds (terciles), and explicit thresholds reproduce any other split.
    """
    if thresholds is not None:
        low, high = float(thresholds[0]), float(thresholds[1])
        if low > high:
            raise ValueError(f"partition thresholds must be (low, high) with low <= high, got {thresholds}")
        return low, high
    if not scores:
        raise ValueError("no scored rows to partition")
    q = torch.quantile(torch.tensor(list(scores), dtype=torch.float64), torch.tensor([1 / 3, 2 / 3], dtype=torch.float64))
    return float(q[0]), float(q[1])


def partition_rows(
    rows: Sequence[Row], scores: Sequence[Optional[float]], part: str, thresholds: Optional[Tuple[float, float]] = None
) -> List[Row]:
    """Rows of one partition: ``noisy`` (s < low), ``borderline`` (low <= s < high), ``clean`` (s >= high).

    ``scores`` holds one similarity per row (``None`` for skipped / unreadable rows, which are kept
    as skips so they are still reported).
    """
    if part not in PARTS:
        raise ValueError(f"partition must be one of {PARTS}, got {part!r}")
    low, high = partition_bounds([s for s in scores if s is not None], thresholds)
    keep = {"noisy": lambda s: s < low, "borderline": lambda s: low <= s < high, "clean": lambda s: s >= high}[part]
    out: List[Row] = []
    for row, sim in zip(rows, scores):
        if sim is None:
            out.append(_mark_unscored(row))
        elif keep(sim):
            out.append({**row, "similarity": sim})
    return out
