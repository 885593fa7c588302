"""Retrieval ROAR without retraining (AdaIB App. F, Table 3): how much zero-shot retrieval drops when the
features a map ranks highest are removed.

Protocol (AdaIB App. F, "following M2IB"): per pair, remove the image pixels above the 75th percentile of the
image map (replaced by the image's channel means) and the caption tokens above the 90th percentile of the
token map (replaced by a blank token); embed the clean and the corrupted inputs with the frozen model; measure
top-1 zero-shot retrieval accuracy over the pool of evaluated pairs (a query's hit: its own partner scores
strictly highest); score ``(Acc_o - Acc_c) / Acc_o`` (higher = the removed features mattered more; AdaIB
Table 3 reports it in %, clipib as a fraction).

The four settings ``x2y-ab`` (Table 3's caption: "For i2t-oc, the image features are original (o) while the
text features are corrupted (c) [...] The same logic applies to the t2i metrics"). clipib reads the letters as
(query, gallery), ``naming="query_gallery"`` (default):

* ``i2t_oc``: clean image queries, corrupted captions as gallery (removes text features);
* ``i2t_co``: corrupted image queries, clean captions (removes image features);
* ``t2i_oc``: clean caption queries, corrupted images (removes image features);
* ``t2i_co``: corrupted caption queries, clean images (removes text features).

``naming="image_text"`` reads them as (image, text) in both directions, which swaps the two t2i names. ``Acc_o``
is the clean-clean accuracy of the direction on the same pool.

Choices where the paper is silent or ambiguous (each an option):

* ``ties="rank"`` (default): per sample exactly the number of features above the percentile of a tie-free map
  (:func:`clipib.removal.top_fraction_mask`); ``"threshold"`` is the literal ``score > percentile``, identical on
  tie-free maps, which removes nothing from a plateau map (a binary ground-truth mask covering more than a
  quarter of the image, 0/1 gold tokens), so the anchors would not compare.
* ``blank_id=0`` (default, :data:`clipib.removal.PAD_ID`): open_clip's padding id, M2IB's blank token; AdaIB
  writes 49407 (:data:`~clipib.removal.EOT_ID`), offered. ``text_pool="original"`` (default) pools every
  corrupted caption at its clean EOT, so removal changes content only; ``"model"`` re-encodes the corrupted ids
  with the tower's own rule (with ``blank_id=49407`` and an ``argmax`` tower: at the first blank).
* The pool: ``pool_size=None`` (default) - every evaluated matched pair of the run in one pool (AdaIB does not
  state its pool); an int splits the pairs, ordered by a hash of their key, into pools of about that size (for
  comparison with 1k-pair retrieval benchmarks, or to bound the ``N x N`` similarity cost). Mismatched pairs
  (``matched`` False) are left out: their "partner" is not a correct retrieval target.

Cost: per pair, method and seed, 2 tower passes (the corrupted image and caption), plus 2 for the clean pair at
seed 0. State: float32 embeddings, ``8 E`` bytes per pair and seed plus ``8 E`` per pair for the clean ones
(E = embedding width: 4 KB each at ViT-B/32), gathered on every process at the end; the similarity is
computed ``chunk`` query rows at a time. Resuming an interrupted eval run is refused (the finished pairs'
embeddings are not in the records).
"""
from __future__ import annotations

import hashlib
from typing import Any, ClassVar, Dict, List, Optional, Sequence

import torch
from torch import Tensor
from torchmetrics.utilities import dim_zero_cat

from clipib.attribution.base import Attribution
from clipib.metrics.base import AttributionMetric, Batch, caption_rule
from clipib.models.split import SplitCLIP
from clipib.removal import (
    IMAGE_FILLS, PAD_ID, TIES, content_tokens, remove_image, remove_tokens, top_fraction_mask,
)

__all__ = ["SETTINGS", "key_hashes", "retrieval_hits", "retrieval_accuracy", "roar_score", "RetrievalROAR"]

SETTINGS = ("i2t_oc", "i2t_co", "t2i_oc", "t2i_co")
"""The four settings of AdaIB Table 3."""
_NAMINGS = ("query_gallery", "image_text")


def retrieval_hits(queries: Tensor, gallery: Tensor, top_k: int = 1, chunk: int = 1024) -> Tensor:
    """``BoolTensor[N]``: query ``i`` ranks its partner ``gallery[i]`` among the ``top_k`` of the gallery.

    ``queries``, ``gallery``: ``[N, E]`` L2-normalised embeddings, row ``i`` of each from pair ``i``. The rank
    of the partner is the number of gallery items scoring strictly higher (ties favour the partner).

    Example:
        >>> q = torch.eye(3); g = torch.tensor([[1.0, 0, 0], [0, 0.6, 0.8], [0, 0.8, 0.6]])
        >>> retrieval_hits(q, g).tolist()  # queries 1 and 2 score each other's partner higher (0.8 > 0.6)
        [True, False, False]
    """
    if queries.shape != gallery.shape:
        raise ValueError(f"queries and gallery differ: {tuple(queries.shape)} vs {tuple(gallery.shape)}")
    out = []
    for rows in torch.arange(queries.shape[0], device=queries.device).split(chunk):
        sims = queries[rows].double() @ gallery.double().T  # [c, N]
        own = sims.gather(1, rows[:, None])  # [c, 1]
        out.append((sims > own).sum(1) < top_k)
    return torch.cat(out) if out else torch.zeros(0, dtype=torch.bool, device=queries.device)


def retrieval_accuracy(queries: Tensor, gallery: Tensor, pool_size: Optional[int] = None, top_k: int = 1,
                       chunk: int = 1024) -> Tensor:
    """Top-``k`` retrieval accuracy (float64 scalar) of pairs ``[N, E]`` in the given row order, within
    ``ceil(N / pool_size)`` consecutive pools of near-equal size (``None``: one pool of all N).

    Example:
        >>> e = torch.eye(4)
        >>> float(retrieval_accuracy(e, e)), float(retrieval_accuracy(e, torch.ones(4, 4) / 2))
        (1.0, 1.0)
    """
    n = queries.shape[0]
    if n == 0:
        return torch.tensor(float("nan"), dtype=torch.float64)
    pools = 1 if pool_size is None else -(-n // pool_size)
    hits = [retrieval_hits(queries[p], gallery[p], top_k, chunk)
            for p in torch.arange(n, device=queries.device).tensor_split(pools)]
    return torch.cat(hits).double().mean()


def roar_score(acc_o: Tensor, acc_c: Tensor) -> Tensor:
    """``(Acc_o - Acc_c) / Acc_o`` (AdaIB App. F); NaN where ``Acc_o`` is 0.

    Example:
        >>> float(roar_score(torch.tensor(0.8), torch.tensor(0.2)))
        0.75
    """
    acc_o = torch.as_tensor(acc_o, dtype=torch.float64)
    return torch.where(acc_o > 0, (acc_o - acc_c) / acc_o.clamp_min(1e-300), torch.full_like(acc_o, float("nan")))


class RetrievalROAR(AttributionMetric):
    """Retrieval ROAR (registry name ``retrieval_roar``): ``roar_<setting>`` and the accuracies behind them.

    A dataset-level metric: :meth:`update` embeds the clean and corrupted pairs of a batch and keeps the
    embeddings (``dist_reduce_fx="cat"`` states, gathered over processes); :meth:`compute` retrieves over the
    pool(s) per seed. It writes no per-pair records. Reported per method: ``roar_i2t_oc``, ``roar_i2t_co``,
    ``roar_t2i_oc``, ``roar_t2i_co`` (mean ± std over seeds), the clean accuracies ``acc_i2t_oo`` /
    ``acc_t2i_oo`` and the corrupted ones ``acc_<setting>``; ``n`` = pairs in the pools. A setting needs the
    map of the modality it corrupts (an image-only method reports the image settings).

    Args:
        n_seeds: seeds of the run (eval passes it).
        image_quantile: remove pixels above this per-image quantile of the map (AdaIB App. F: 0.75).
        text_quantile: remove content tokens above this per-caption quantile (AdaIB App. F: 0.9).
        image_fill: ``"mean"`` (AdaIB / M2IB: the image's channel means), ``"blur"``, ``"road"`` or a constant
            (:func:`clipib.removal.remove_image`; ROAD's noise is seeded by the pair key).
        blank_id: the token removed tokens become (default 0, see the module doc; AdaIB writes 49407).
        ties: ``"rank"`` (default) or ``"threshold"`` (:func:`clipib.removal.top_fraction_mask`).
        text_pool: ``"original"`` (default) or ``"model"`` (see the module doc).
        pool_size: ``None`` (all pairs, default) or the size of the retrieval pools.
        top_k: a hit is the partner within the top k (default 1: accuracy = R@1).
        naming: ``"query_gallery"`` (default) or ``"image_text"`` (see the module doc).
        chunk: query rows per similarity block.
    """

    VALUES: ClassVar[Dict[str, tuple]] = {}
    resumable: ClassVar[bool] = False
    higher_is_better = True

    def __init__(self, n_seeds: int = 1, image_quantile: float = 0.75, text_quantile: float = 0.9,
                 image_fill: str | float = "mean", blank_id: int = PAD_ID, ties: str = "rank",
                 text_pool: str = "original", pool_size: Optional[int] = None, top_k: int = 1,
                 naming: str = "query_gallery", chunk: int = 1024, **kwargs: Any) -> None:
        super().__init__(n_seeds=n_seeds, **kwargs)
        for name, q in (("image_quantile", image_quantile), ("text_quantile", text_quantile)):
            if not 0.0 <= q <= 1.0:
                raise ValueError(f"{name} must lie in [0, 1], got {q}")
        if isinstance(image_fill, str) and image_fill not in IMAGE_FILLS:
            raise ValueError(f"image_fill must be one of {IMAGE_FILLS} or a number, got {image_fill!r}")
        checks = (("ties", ties, TIES), ("text_pool", text_pool, ("original", "model")), ("naming", naming, _NAMINGS))
        for name, value, allowed in checks:
            if value not in allowed:
                raise ValueError(f"{name} must be one of {allowed}, got {value!r}")
        if pool_size is not None and pool_size < 2:
            raise ValueError(f"pool_size must be >= 2 (or None: one pool), got {pool_size}")
        if top_k < 1 or chunk < 1:
            raise ValueError(f"top_k and chunk must be >= 1, got {top_k}, {chunk}")
        self.image_quantile, self.text_quantile, self.image_fill = image_quantile, text_quantile, image_fill
        self.blank_id, self.ties, self.text_pool, self.pool_size = blank_id, ties, text_pool, pool_size
        self.top_k, self.naming, self.chunk = top_k, naming, chunk
        self._seen: Optional[tuple] = None  # (images, ids) whose clean embeddings are stored (not a state)
        for state in ("clean_key", "clean_image", "clean_text", "image_key", "image_seed", "image_emb",
                      "text_key", "text_seed", "text_emb"):
            self.add_state(state, default=[], dist_reduce_fx="cat")

    def update(self, clip: SplitCLIP, batch: Batch, attr: Attribution, modality: str,  # type: ignore[override]
               seed_index: int = 0, method: Any = None, seeds: Any = None) -> Dict[str, Tensor]:
        """Embed the batch's clean pairs and its pairs with ``modality``'s top features removed; returns ``{}``."""
        if not 0 <= seed_index < self.n_seeds:
            raise IndexError(f"seed_index {seed_index} out of range for n_seeds={self.n_seeds}")
        maps = attr.image if modality == "image" else attr.text_raw if attr.text_raw is not None else attr.text
        if maps is None:
            return {}
        keys = batch.get("key")
        if keys is None:
            raise ValueError("retrieval_roar needs batch['key'] (pairs are pooled and de-duplicated by key)")
        images, ids = batch["image"], batch["ids"]
        keep = torch.ones(len(keys), dtype=torch.bool, device=images.device)
        if batch.get("matched") is not None:
            keep = torch.as_tensor(batch["matched"], device=images.device).reshape(-1).bool()
        hashes = key_hashes(keys).to(images.device)
        seen = self._seen is not None and self._seen[0] is images and self._seen[1] is ids
        with torch.no_grad():
            if seed_index == 0 and not seen:  # the clean pairs, once per batch (repeats are dropped in compute)
                self._seen = (images, ids)
                self._append("clean_key", hashes[keep])
                self._append("clean_image", clip.image.encode(images)[keep].float())
                self._append("clean_text", clip.text.encode(ids)[keep].float())
            corrupt = self._corrupt_images(clip, images, maps, hashes) if modality == "image" else \
                self._corrupt_texts(clip, ids, maps)
        self._append(f"{modality}_key", hashes[keep])
        self._append(f"{modality}_seed", torch.full_like(hashes[keep], seed_index))
        self._append(f"{modality}_emb", corrupt[keep].float())
        return {}

    def reset(self) -> None:
        """Clear the states and the memory of the last batch's clean pairs."""
        super().reset()
        self._seen = None

    def _append(self, state: str, value: Tensor) -> None:
        getattr(self, state).append(value.detach())

    def _corrupt_images(self, clip: SplitCLIP, images: Tensor, maps: Tensor, hashes: Tensor) -> Tensor:
        gone = top_fraction_mask(maps, quantile=self.image_quantile, ties=self.ties)  # [B, H, W]
        mean, std = clip.normalization
        x = remove_image(images, gone, self.image_fill, seeds=hashes, mean=mean, std=std)
        return clip.image.encode(x)

    def _corrupt_texts(self, clip: SplitCLIP, ids: Tensor, maps: Tensor) -> Tensor:
        ends, start = caption_rule(clip.text, ids)
        content = content_tokens(ids, ends, start)  # [B, L]
        gone = top_fraction_mask(maps.to(ids.device), quantile=self.text_quantile, valid=content, ties=self.ties)
        new_ids = remove_tokens(ids, gone, self.blank_id)
        if self.text_pool == "model":
            return clip.text.encode(new_ids)
        return clip.text.encode_embeddings(clip.text.token_embeddings(new_ids), clip.text.eot_positions(ids))

    def compute(self) -> Dict[str, Dict[str, Tensor]]:  # type: ignore[override]
        """``{value: {"mean", "std", "n", "std_over_seeds"}}`` over every process's pairs (``{}`` when none)."""
        if isinstance(self.clean_key, list) and not self.clean_key:
            return {}
        key, order = _unique(dim_zero_cat(self.clean_key))
        clean_i, clean_t = dim_zero_cat(self.clean_image)[order], dim_zero_cat(self.clean_text)[order]
        per_seed: Dict[str, List[Tensor]] = {}
        counts: Dict[str, float] = {}
        for s in range(self.n_seeds):
            for modality in ("image", "text"):
                if isinstance(getattr(self, f"{modality}_key"), list) and not getattr(self, f"{modality}_key"):
                    continue
                mk, ms = dim_zero_cat(getattr(self, f"{modality}_key")), dim_zero_cat(getattr(self, f"{modality}_seed"))
                rows = ms == s
                if not rows.any():
                    continue
                ck, corder = _unique(mk[rows])
                corrupt = dim_zero_cat(getattr(self, f"{modality}_emb"))[rows][corder]
                at = torch.searchsorted(key, ck).clamp(max=len(key) - 1)
                if not torch.equal(key[at], ck):
                    raise RuntimeError("retrieval_roar: corrupted pairs without clean ones (seed 0 never updated)")
                for name, value in self._scores(modality, clean_i[at], clean_t[at], corrupt).items():
                    per_seed.setdefault(name, []).append(value)
                    counts.setdefault(name, float(len(ck)))
        return {name: _stats(values, counts[name], self.n_seeds) for name, values in per_seed.items()}

    def _scores(self, modality: str, img: Tensor, txt: Tensor, corrupt: Tensor) -> Dict[str, Tensor]:
        """The accuracies and scores of the two settings that corrupt ``modality``, on one pool set."""
        acc = lambda q, g: retrieval_accuracy(q, g, self.pool_size, self.top_k, self.chunk)  # noqa: E731
        clean = {"i2t": acc(img, txt), "t2i": acc(txt, img)}
        if modality == "image":  # (name under query_gallery, direction, accuracy)
            settings = [("i2t_co", "i2t", acc(corrupt, txt)), ("t2i_oc", "t2i", acc(txt, corrupt))]
        else:
            settings = [("i2t_oc", "i2t", acc(img, corrupt)), ("t2i_co", "t2i", acc(corrupt, img))]
        out = {f"acc_{d}_oo": clean[d] for _, d, _ in settings}
        for name, direction, value in settings:
            if self.naming == "image_text" and direction == "t2i":
                name = {"t2i_oc": "t2i_co", "t2i_co": "t2i_oc"}[name]
            out[f"acc_{name}"] = value
            out[f"roar_{name}"] = roar_score(clean[direction], value)
        return out


def key_hashes(keys: Sequence[str]) -> Tensor:
    """``LongTensor[B]``: a 63-bit hash of each sample key (BLAKE2b), the pairs' identity and pool order.

    Example:
        >>> bool(key_hashes(["a", "b"])[1] == key_hashes(["b"])[0])
        True
    """
    digest = [int.from_bytes(hashlib.blake2b(str(k).encode(), digest_size=8).digest(), "little") >> 1 for k in keys]
    return torch.tensor(digest, dtype=torch.int64)


def _unique(key: Tensor) -> tuple[Tensor, Tensor]:
    """``(sorted unique keys, index of each key's first row)``: de-duplicates pairs seen twice (DDP padding)."""
    srt, order = torch.sort(key, stable=True)
    first = torch.ones_like(srt, dtype=torch.bool)
    first[1:] = srt[1:] != srt[:-1]
    return srt[first], order[first]


def _stats(values: List[Tensor], n: float, n_seeds: int) -> Dict[str, Tensor]:
    v = torch.stack([torch.as_tensor(x, dtype=torch.float64).cpu() for x in values])  # [S]
    std = v.std(unbiased=True) if len(v) >= 2 else torch.tensor(0.0, dtype=torch.float64)
    return {"mean": v.mean(), "std": std, "n": torch.tensor(n, dtype=torch.float64),
            "std_over_seeds": torch.tensor(float(len(v) >= 2), dtype=torch.float64)}
