"""Map-style sources over table rows (TSV, CSV, Flickr8k, class folders, refcoco), with the shared
selection options.

A row source reads its rows in :meth:`RowSource.prepare`, applies the :class:`Selection` options in the
order read -> ``sample`` -> caption choice (Flickr8k) -> ``mismatched`` -> ``partition``, then drops the
excluded keys; only then is any item decoded. The caption choice and ``partition`` score rows with the
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
        sample, sample_seed: a fixed-seed sample of ``sample`` usable rows (``random.Random(sample_seed)``).
        mismatched, mismatch_seed: give every row another row's caption (``matched=False``); ``"both"``
            keeps the original pairs and adds the shuffled ones (AdaIB App. C, matched-vs-mismatched AUROC).
        partition, partition_thresholds: keep the ``noisy`` / ``borderline`` / ``clean`` third by CLIP
            similarity (AdaIB Table 5), or split at explicit ``(low, high)`` similarities.
    """

    sample: Optional[int] = None
    sample_seed: int = 0
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
        """Apply ``sample``, :meth:`choose`, ``mismatched`` and ``partition`` to ``rows``."""
        opts = self.selection
        if opts.sample:
            rows = selection.sample_rows(rows, opts.sample, opts.sample_seed)
        rows = self.choose(rows)
        if opts.mismatched == "both":  # AdaIB App. C: every pair once as is, once with a shuffled caption
            rows = list(rows) + [r for r in selection.mismatch_rows(rows, opts.mismatch_seed) if "skip" not in r]
        elif opts.mismatched:
            rows = selection.mismatch_rows(rows, opts.mismatch_seed)
        if opts.partition:
            sims = [s[0] if s else None for s in self.scores(rows)]
            bounds = selection.partition_bounds([s for s in sims if s is not None], opts.partition_thresholds)
            rows = selection.partition_rows(rows, sims, opts.partition, bounds)
            self._info["partition_bounds"] = bounds
        return rows

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
