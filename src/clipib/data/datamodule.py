"""``ClipDataModule``: one LightningDataModule for every clipib evaluation source.

Batches follow the clipib contract (:class:`clipib.data.common.ClipCollate`)::

    {"image": [B, 3, H, W], "ids": [B, ctx], "key": list[str], "caption": list[str],
     "matched": [B] bool, "skipped": list[{"key", "reason"}],
     "box": [B, 4] xyxy (refcoco), "mask": [B, H, W] + "has_mask": [B] (refcoco lines with masks)}

Each sample — and each skipped sample — appears in exactly one batch of one rank (map-style data:
:class:`~clipib.data.samplers.UnrepeatedDistributedSampler`; shards: :mod:`clipib.data.webdataset`).
``B`` can be 0 when a whole batch was skipped.

Options are applied to map-style rows in this order: read -> ``sample`` -> Flickr8k caption choice ->
``mismatched`` -> ``partition``. The caption choice (``caption_choice="best"``) and ``partition``
need a scoring callable ``score(images [B,3,H,W], captions) -> Tensor[B]`` (cosine similarity of
each pair; it moves images to its own device): set ``datamodule.score``, or give the LightningModule
a ``score_pairs`` method, else the module's ``clip`` (a SplitCLIP) is used through
:func:`~clipib.data.selection.clip_scorer`; it is looked up when the first dataloader is built, after
every ``setup``.
"""

from __future__ import annotations

from typing import Any, Dict, List, Literal, Optional, Tuple, Union

import torch.distributed as dist
from lightning.pytorch import LightningDataModule
from torch.utils.data import DataLoader, Dataset

from clipib.data import selection
from clipib.data.common import ClipCollate, Preprocess, Tokenizer, input_size, resolve_transforms
from clipib.data.refcoco import GroundingDataset, read_refcoco
from clipib.data.samplers import UnrepeatedDistributedSampler
from clipib.data.tables import PairDataset, Row, read_csv, read_flickr8k, read_folders, read_tsv
from clipib.data.webdataset import ShardDataset

Kind = Literal["webdataset", "tsv", "csv", "flickr8k", "folders", "refcoco", "synthetic"]


class ClipDataModule(LightningDataModule):
    """Evaluation data for clipib (see the module docstring for the batch and the options).

    Args:
        kind: ``webdataset`` (shards), ``tsv`` (Conceptual Captions), ``csv`` (``caption,file_path``),
            ``flickr8k`` (``en_val.json``), ``folders`` (class folders + ``prompt``), ``refcoco``
            (grounding JSON lines), ``synthetic`` (the shapes world's test split).
        path: shard pattern(s) / table file / folder root.
        image_root: folder that image references are relative to (default: the table's folder).
        model: open_clip model name whose preprocess and tokenizer are used.
        batch_size, num_workers: DataLoader settings (records do not depend on them).
        sample, sample_seed: evaluate a fixed-seed sample of ``sample`` usable rows.
        mismatched, mismatch_seed: give every row another row's caption (``matched=False``); ``"both"``
            keeps the original pairs and adds the shuffled ones (for the matched-vs-mismatched AUROC).
        partition, partition_thresholds: keep the ``noisy`` / ``borderline`` / ``clean`` third by CLIP
            similarity (AdaIB Table 5), or split at explicit ``(low, high)`` similarities.
        caption_choice: Flickr8k — ``"best"`` (most similar to its own image, needs scoring) or an index.
        prompt, per_class, synonyms, annotations: ``folders`` options (:func:`~clipib.data.tables.read_folders`).
        box_format: ``refcoco`` box layout in the file, ``xywh`` (COCO) or ``xyxy``.
        tsv_header: the TSV has a header line.
        split: webdataset split mode, ``auto`` | ``shard`` | ``sample`` (:mod:`clipib.data.webdataset`).
        synthetic_size, synthetic_seed, synthetic_mismatch_rate: the shapes world's test split
            (``clipib.data.synthetic.ShapesDataset``; its pairs carry their own mismatches).
    """

    def __init__(
        self,
        kind: Kind = "webdataset",
        path: Union[str, List[str]] = "",
        image_root: Optional[str] = None,
        model: str = "ViT-B-32-quickgelu",
        batch_size: int = 32,
        num_workers: int = 0,
        sample: Optional[int] = None,
        sample_seed: int = 0,
        mismatched: Union[bool, Literal["both"]] = False,
        mismatch_seed: int = 0,
        partition: Optional[Literal["noisy", "borderline", "clean"]] = None,
        partition_thresholds: Optional[Tuple[float, float]] = None,
        caption_choice: Union[Literal["best"], int] = "best",
        prompt: str = "a photo of a {}",
        per_class: Optional[int] = None,
        synonyms: Union[None, str, Dict[str, str]] = None,
        annotations: Optional[str] = None,
        box_format: Literal["xywh", "xyxy"] = "xywh",
        tsv_header: bool = False,
        split: Literal["auto", "shard", "sample"] = "auto",
        synthetic_size: int = 1024,
        synthetic_seed: int = 2,
        synthetic_mismatch_rate: float = 0.0,
    ) -> None:
        super().__init__()
        # logger=False: Lightning refuses to log when a key (model, batch_size, ...) is in both the module's
        # and the datamodule's hparams with different values; LightningCLI's config.yaml keeps these anyway.
        self.save_hyperparameters(logger=False)
        if kind in ("webdataset", "synthetic") and (sample or mismatched or partition):
            raise ValueError(f"sample / mismatched / partition need a table kind, not {kind!r}")
        self.score: Optional[selection.Score] = None
        self.info: Dict[str, Any] = {"kind": kind}
        self._transforms: Optional[Tuple[Preprocess, Tokenizer]] = None
        self._dataset: Optional[Dataset] = None

    @property
    def transforms(self) -> Tuple[Preprocess, Tokenizer]:
        """``(preprocess, tokenizer)`` of ``model`` (resolved once; :meth:`set_transforms` overrides)."""
        if self._transforms is None:
            self._transforms = resolve_transforms(self.hparams.model)
        return self._transforms

    def set_transforms(self, preprocess: Preprocess, tokenizer: Tokenizer) -> None:
        """Use these transforms (e.g. the loaded model's own) instead of the ``model`` name's."""
        self._transforms = (preprocess, tokenizer)
        self._dataset = None

    @property
    def collate(self) -> ClipCollate:
        """The batch collate for the current transforms."""
        preprocess, tokenizer = self.transforms
        return ClipCollate(tokenizer, input_size(preprocess))

    def rank_world(self) -> Tuple[int, int]:
        """``(rank, world_size)`` from the attached trainer, else ``torch.distributed``, else ``(0, 1)``."""
        if self.trainer is not None:
            return int(self.trainer.global_rank), int(self.trainer.world_size)
        if dist.is_available() and dist.is_initialized():
            return dist.get_rank(), dist.get_world_size()
        return 0, 1

    def read_rows(self) -> List[Row]:
        """Rows of a map-style ``kind`` as read from ``path`` (no options applied)."""
        hp = self.hparams
        if hp.kind == "tsv":
            return read_tsv(hp.path, hp.image_root, header=hp.tsv_header)
        if hp.kind == "csv":
            return read_csv(hp.path, hp.image_root)
        if hp.kind == "flickr8k":
            return read_flickr8k(hp.path, hp.image_root)
        if hp.kind == "folders":
            return read_folders(hp.path, hp.prompt, hp.per_class, hp.synonyms, hp.annotations)
        if hp.kind == "refcoco":
            return read_refcoco(hp.path, hp.image_root, box_format=hp.box_format)
        raise ValueError(f"unknown data kind {hp.kind!r}")

    def _scorer(self) -> selection.Score:
        """``self.score``, else the LightningModule's ``score_pairs``, else cosine with its ``clip``."""
        module = self.trainer.lightning_module if self.trainer is not None else None
        score = self.score or getattr(module, "score_pairs", None)
        if score is None and getattr(module, "clip", None) is not None:
            score = selection.clip_scorer(module.clip)
        if score is None:
            raise ValueError("this data option needs CLIP scores: set datamodule.score, or give the module score_pairs or clip")
        return score

    def _score(self, rows: List[Row]) -> List[Optional[List[float]]]:
        """Scores of ``rows`` (rank 0's, broadcast, so every rank selects exactly the same rows)."""
        hp = self.hparams
        scores = selection.score_rows(rows, self.transforms[0], self._scorer(), hp.batch_size, hp.num_workers)
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            box = [scores]
            dist.broadcast_object_list(box, src=0)
            scores = box[0]
        return scores

    def select(self, rows: List[Row]) -> List[Row]:
        """Apply ``sample``, the Flickr8k caption choice, ``mismatched`` and ``partition`` to ``rows``."""
        hp = self.hparams
        if hp.sample:
            rows = selection.sample_rows(rows, hp.sample, hp.sample_seed)
        if hp.kind == "flickr8k":
            if hp.caption_choice == "best":
                rows = selection.choose_best_captions(rows, self._score(rows))
            else:
                rows = [_pick_caption(r, int(hp.caption_choice)) for r in rows]
        if hp.mismatched == "both":  # AdaIB App. C: every pair once as is, once with a shuffled caption
            rows = list(rows) + [r for r in selection.mismatch_rows(rows, hp.mismatch_seed) if "skip" not in r]
        elif hp.mismatched:
            rows = selection.mismatch_rows(rows, hp.mismatch_seed)
        if hp.partition:
            sims = [s[0] if s else None for s in self._score(rows)]
            bounds = selection.partition_bounds([s for s in sims if s is not None], hp.partition_thresholds)
            rows = selection.partition_rows(rows, sims, hp.partition, bounds)
            self.info["partition_bounds"] = bounds
        self.info["rows"] = len(rows)
        return rows

    def build_dataset(self) -> Dataset:
        """The dataset for this rank (shards split for it; map-style rows selected)."""
        if self.hparams.kind == "synthetic":
            return self._synthetic()
        if not self.hparams.path:
            raise ValueError(f"data.path is required for kind={self.hparams.kind!r}")
        preprocess = self.transforms[0]
        if self.hparams.kind == "webdataset":
            # without a trainer, leave rank discovery to webdataset (RANK/WORLD_SIZE, torch.distributed)
            rank, world = self.rank_world() if self.trainer is not None else (None, None)
            return ShardDataset(self.hparams.path, preprocess, rank=rank, world_size=world, split=self.hparams.split)
        rows = self.select(self.read_rows())
        cls = GroundingDataset if self.hparams.kind == "refcoco" else PairDataset
        return cls(rows, preprocess)

    def _synthetic(self) -> Dataset:
        """The shapes world's test split (``clipib.data.synthetic``, a separate module)."""
        try:
            from clipib.data.synthetic import ShapesDataset
        except ImportError as exn:
            raise ValueError(f"kind='synthetic' needs clipib.data.synthetic.ShapesDataset ({exn})") from None
        hp, (preprocess, tokenizer) = self.hparams, self.transforms
        return ShapesDataset(size=hp.synthetic_size, seed=hp.synthetic_seed, split="test",
                             mismatch_rate=hp.synthetic_mismatch_rate, preprocess=preprocess, tokenizer=tokenizer)

    @property
    def dataset(self) -> Dataset:
        """The evaluated dataset (built on first use)."""
        if self._dataset is None:
            self._dataset = self.build_dataset()
        return self._dataset

    def _eval_loader(self) -> DataLoader:
        dataset, (rank, world) = self.dataset, self.rank_world()
        sampler = None
        if world > 1 and not isinstance(dataset, ShardDataset):
            if len(dataset) < world:  # a rank without batches would skip the loop and hang the others
                raise ValueError(f"{len(dataset)} samples cannot be split over {world} processes; use fewer devices")
            sampler = UnrepeatedDistributedSampler(dataset, num_replicas=world, rank=rank)
        return DataLoader(
            dataset, batch_size=self.hparams.batch_size, num_workers=self.hparams.num_workers,
            sampler=sampler, shuffle=False, collate_fn=self.collate,
        )

    def test_dataloader(self) -> DataLoader:
        """Evaluation batches: every sample (and every skip) exactly once over ranks and workers."""
        return self._eval_loader()

    def predict_dataloader(self) -> DataLoader:
        """Same batches as :meth:`test_dataloader`."""
        return self._eval_loader()


def _pick_caption(row: Row, index: int) -> Row:
    """Flickr8k row with caption ``index`` of its candidates (a skip when it has fewer)."""
    candidates = row.get("candidates", [])
    if "skip" in row:
        return row
    if not -len(candidates) <= index < len(candidates):
        return {**row, "skip": f"no caption #{index}"}
    return {**row, "caption": candidates[index]}
