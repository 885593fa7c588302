"""Map-style sources over table rows (TSV, CSV, Flickr8k, class folders, refcoco), with the shared
selection options.

A row source reads its rows in :meth:`RowSource.prepare`, applies the :class:`Selection` options in the
order read -> ``sample`` (one per run seed with ``resample``) -> caption choice (Flickr8k) -> ``mismatched`` ->
``partition``, then drops the excluded keys; only then is any item decoded. With per-run samples the rows are
the union of the samples, each once, with ``"run_seeds"`` (:func:`clipib.data.selection.merge_draws`). The caption choice and ``partition`` score rows with the
model's pair scorer (``ModelTransforms.score``): every row is scored (a row's selection depends on the
others' scores), on rank 0, whose scores are broadcast so that every rank selects the same rows.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, Iterable, List, Literal, Optional, Tuple, Union

import torch.distributed as dist

import clipib.data.selection as selection
from clipib.data.common import Item, Row, load_row
from clipib.data.sources.base import Source


@dataclass
class Selection:
    """Which rows of a table are evaluated (all options off by default).

    Args:
        sample, sample_seed: a sample of ``sample`` usable rows (``random.Random``).
        resample: with ``sample``, each run seed draws its own sample (seeded by ``sample_seed`` and the run
            seed, :func:`clipib.data.selection.draw_seed`), as AdaIB App. A.2 draws a new 2,000 pairs per run:
            the std over run seeds then includes the sampling spread (and a deterministic method gets one).
            Rows carry ``"run_seeds"`` (which runs' samples hold them); the union is read once and a method
            runs on a row only under those seeds. ``False``: one sample (``random.Random(sample_seed)``) for
            every run seed, so the std over seeds is the methods' own noise only.
        mismatched, mismatch_seed: give every row another row's caption (``matched=False``); ``"both"``
            keeps the original pairs and adds the shuffled ones (AdaIB App. C, matched-vs-mismatched AUROC).
            With per-run samples, each run's sample is shuffled within itself (seed from ``mismatch_seed``
            and the run seed).
        partition, partition_thresholds: keep the ``noisy`` / ``borderline`` / ``clean`` third by CLIP
            similarity (AdaIB Table 5), or split at explicit ``(low, high)`` similarities.
    """

    sample: Optional[int] = None
    sample_seed: int = 0
    resample: bool = True
    mismatched: Union[bool, Literal["both"]] = False
    mismatch_seed: int = 0
    partition: Optional[Literal["noisy", "borderline", "clean"]] = None
    partition_thresholds: Optional[Tuple[float, float]] = None


class RowSource(Source):
    """A map-style source whose rows come from :meth:`read_rows`; item ``i`` is row ``i`` decoded.

    Subclasses implement :meth:`read_rows` (and may override :meth:`choose` and :meth:`extras`).
    """

    def __init__(self, selection: Optional[Selection] = None) -> None:
        """Store the selection options; rows are read in :meth:`prepare`."""
        super().__init__()
        self.selection = selection or Selection()
        self.rows: Optional[List[Row]] = None
        self._info: Dict[str, Any] = {}
        self._batching: Tuple[int, int] = (32, 0)  # (batch_size, num_workers) for scoring rows

    def read_rows(self) -> List[Row]:
        """All rows of the source, in file order, skips included (no option applied)."""
        raise NotImplementedError

    def choose(self, rows: List[Row]) -> List[Row]:
        """Per-row caption choice after sampling (Flickr8k); rows as they are by default."""
        return rows

    def extras(self, row: Row, size: tuple) -> Dict[str, Any]:
        """Extra item fields from a row and the original image size ``(W, H)`` (none by default)."""
        return {}

    def exclude(self, keys: Iterable[str]) -> None:
        """Leave out rows with these keys (from the selected rows when they were read already)."""
        super().exclude(keys)
        if self.rows is not None:
            self.rows = [r for r in self.rows if r["key"] not in self.excluded]

    def prepare(self, rank: Optional[int], world_size: Optional[int], batch_size: int, num_workers: int) -> None:
        """Read, select and drop excluded keys (once; the dataset is then fixed)."""
        if self.rows is not None:
            return
        self._batching = (batch_size, num_workers)
        rows = self.select(self.read_rows())
        self.rows = [r for r in rows if r["key"] not in self.excluded]
        self._info["rows"] = len(rows)
        self._info["excluded"] = len(rows) - len(self.rows)

    def scores(self, rows: List[Row]) -> List[Optional[List[float]]]:
        """Similarity of each row's image with each of its captions (rank 0's, broadcast to every rank)."""
        transforms = self.need_transforms()
        if transforms.score is None:
            raise ValueError("this data option needs CLIP scores: hand the model with datamodule.use_model(clip)")
        scores = selection.score_rows(rows, transforms.preprocess, transforms.score, *self._batching)
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            box = [scores]
            dist.broadcast_object_list(box, src=0)
            scores = box[0]
        return scores

    def select(self, rows: List[Row]) -> List[Row]:
        """Apply ``sample`` (per run seed when resampling), :meth:`choose`, ``mismatched`` and ``partition``."""
        opts = self.selection
        draws = selection.plan_draws(opts.sample, opts.resample, opts.sample_seed, opts.mismatch_seed, self.run_seeds)
        if opts.sample:
            usable = [i for i, row in enumerate(rows) if "skip" not in row]
            picks = [[usable[j] for j in selection.sample_positions(len(usable), opts.sample, d.sample_seed)]
                     for d in draws]
        else:
            picks = [list(range(len(rows)))]
        union = sorted(set().union(*picks))
        chosen = dict(zip(union, self.choose([rows[i] for i in union])))  # each row's caption chosen once
        out, bounds = selection.finish_draws(draws, [[chosen[i] for i in p] for p in picks], opts.mismatched,
                                             opts.partition, opts.partition_thresholds, self.scores)
        if bounds is not None:
            self._info["partition_bounds"] = bounds
        self._info.update(draw_info(opts, draws))
        return out

    def __len__(self) -> int:
        """Number of rows after selection and exclusion, skipped ones included (each is reported once)."""
        if self.rows is None:
            raise RuntimeError(f"{type(self).__name__}.prepare(...) must run before the rows are counted")
        return len(self.rows)

    def __getitem__(self, index: int) -> Item:
        """Row ``index`` decoded: ``{"key", "image", "caption", "matched", ...}`` or ``{"key", "skip"}``."""
        if self.rows is None:
            raise RuntimeError(f"{type(self).__name__}.prepare(...) must run before items are read")
        return load_row(self.rows[index], self.need_transforms().preprocess, self.extras)


def draw_info(opts: Selection, draws: List[selection.Draw]) -> Dict[str, Any]:
    """What a source reports about a ``sample``: ``sample`` (pairs per draw), ``resampled`` (one draw per run
    seed) and, when resampled, the ``run_seeds`` drawn for; nothing without a sample."""
    if not opts.sample:
        return {}
    resampled = any(d.run_seed is not None for d in draws)
    return {"sample": opts.sample, "resampled": resampled, **({"run_seeds": [d.run_seed for d in draws]} if resampled else {})}
