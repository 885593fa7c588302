"""The clipib DataModules: :class:`EvalDataModule` (``eval.py``: one source) and :class:`TrainDataModule`
(``train.py``: train / val / test sources). The source is any :class:`~clipib.data.sources.base.Source`,
chosen by ``class_path`` in YAML::

    data:
      class_path: clipib.data.EvalDataModule
      init_args:
        dataset:
          class_path: clipib.data.sources.tables.TsvDataset
          init_args: {path: /data/cc/val.tsv, image_root: /data/cc/images, selection: {sample: 2000}}
        batch_size: 16

Batches follow the clipib contract (:class:`clipib.data.common.ClipCollate`)::

    {"image": [B, 3, H, W], "ids": [B, ctx], "key": list[str], "caption": list[str],
     "matched": [B] bool, "skipped": list[{"key", "reason"}],
     "box": [B, 4] xyxy (refcoco), "mask": [B, H, W] + "has_mask": [B] (refcoco lines with masks),
     + any field every sample has (the shapes world's "gold_tokens" [B, ctx], "present", "pair", ...)}

Each sample — and each skipped sample — appears in exactly one batch of one rank (map-style sources:
:class:`~clipib.data.samplers.UnrepeatedDistributedSampler`; shards: :mod:`clipib.data.sources.webdataset`).
``B`` can be 0 when a whole batch was skipped.

Hand-offs, both before the first DataLoader is built (Lightning: datamodule ``setup``, then callbacks'
``setup``, then the LightningModule's ``setup``):

* :meth:`EvalDataModule.use_model` ``(clip)``: the loaded model's preprocess, CPU tokenizer, input size
  and pair scorer (:func:`clipib.data.selection.clip_scorer`) go to the source (the AttributionModule
  calls it in its ``setup``). Nothing is looked up by model name.
* :meth:`EvalDataModule.use_run_seeds` ``(seeds)``: the run seeds (the AttributionModule hands them with the
  model); with ``Selection(sample=N, resample=True)`` each run seed gets its own sample, and every row carries
  ``"run_seeds"`` (batch field ``run_seeds``: list of lists) naming the runs it belongs to.
* :meth:`EvalDataModule.exclude` ``(keys)``: a resumed run's finished keys (the RecordWriter calls it);
  those samples are never decoded, yielded nor reported as skipped.
"""

from __future__ import annotations

from typing import Any, Dict, Iterable, List, Optional, Sequence, Tuple

import torch.distributed as dist
from lightning.pytorch import LightningDataModule
from torch.utils.data import DataLoader, IterableDataset

from clipib.data.samplers import UnrepeatedDistributedSampler
from clipib.data.sources.base import ModelTransforms, Source


class _SourceDataModule(LightningDataModule):
    """What both DataModules share: the model hand-off, the collate, the process's rank."""

    def __init__(self, batch_size: int, num_workers: int) -> None:
        super().__init__()
        self.batch_size, self.num_workers = batch_size, num_workers
        self.transforms: Optional[ModelTransforms] = None
        self._prepared = False

    def sources(self) -> List[Source]:
        """The sources this module serves."""
        raise NotImplementedError

    def use_model(self, clip: Any) -> None:
        """Hand a loaded :class:`clipib.SplitCLIP`'s preprocess, tokenizer, input size and scorer to the sources."""
        self.use_transforms(ModelTransforms.from_clip(clip))

    def use_transforms(self, transforms: ModelTransforms) -> None:
        """Hand these transforms to the sources (:meth:`use_model` without a SplitCLIP, e.g. in training)."""
        self.transforms = transforms
        for source in self.sources():
            source.use_transforms(transforms)

    def use_run_seeds(self, seeds: Sequence[int]) -> None:
        """Hand the evaluation's run seeds to the sources (a ``sample`` with ``resample`` draws one per seed)."""
        for source in self.sources():
            source.use_run_seeds(seeds)

    def rank_world(self) -> Tuple[int, int]:
        """``(rank, world_size)`` from the attached trainer, else ``torch.distributed``, else ``(0, 1)``."""
        if self.trainer is not None:
            return int(self.trainer.global_rank), int(self.trainer.world_size)
        if dist.is_available() and dist.is_initialized():
            return dist.get_rank(), dist.get_world_size()
        return 0, 1

    def prepare_sources(self) -> None:
        """Let every source read / select / split for this process (once, at the first dataloader)."""
        if self._prepared:
            return
        if self.transforms is None:
            raise RuntimeError(f"{type(self).__name__}: call use_model(clip) (or use_transforms) before the dataloaders")
        # without a trainer, sharded sources find their rank themselves (RANK/WORLD_SIZE, torch.distributed)
        rank, world = self.rank_world() if self.trainer is not None else (None, None)
        for source in self.sources():
            source.prepare(rank, world, self.batch_size, self.num_workers)
        self._prepared = True


class EvalDataModule(_SourceDataModule):
    """Evaluation data from one source (see the module docstring for the batch and the hand-offs).

    Args:
        dataset: the source, chosen by ``class_path`` (:mod:`clipib.data.sources`).
        batch_size, num_workers: DataLoader settings (records do not depend on them).
    """

    def __init__(self, dataset: Source, batch_size: int = 32, num_workers: int = 0) -> None:
        super().__init__(batch_size, num_workers)
        self.dataset = dataset

    def sources(self) -> List[Source]:
        """The one evaluated source."""
        return [self.dataset]

    def exclude(self, keys: Iterable[str]) -> None:
        """Leave out these keys (a resumed run's finished samples): never decoded, yielded nor reported."""
        self.dataset.exclude(keys)

    @property
    def info(self) -> Dict[str, Any]:
        """What the source selected (``rows``, ``excluded``, ``partition_bounds``, …)."""
        return self.dataset.info

    def _eval_loader(self) -> DataLoader:
        self.prepare_sources()
        dataset, (rank, world) = self.dataset, self.rank_world()
        sampler = None
        if world > 1 and not isinstance(dataset, IterableDataset):
            # a rank without batches would skip the loop and hang the others (none at all, e.g. a finished
            # run resumed, is fine: every rank skips alike)
            if 0 < len(dataset) < world:
                raise ValueError(f"{len(dataset)} samples cannot be split over {world} processes; use fewer devices")
            sampler = UnrepeatedDistributedSampler(dataset, num_replicas=world, rank=rank)
        return DataLoader(dataset, batch_size=self.batch_size, num_workers=self.num_workers, sampler=sampler,
                          shuffle=False, collate_fn=self.transforms.collate())

    def test_dataloader(self) -> DataLoader:
        """Evaluation batches: every sample (and every skip) exactly once over ranks and workers."""
        return self._eval_loader()

    def predict_dataloader(self) -> DataLoader:
        """Same batches as :meth:`test_dataloader`."""
        return self._eval_loader()


class TrainDataModule(_SourceDataModule):
    """Training data: ``train`` (and optional ``val`` / ``test``) sources, read in order.

    Sources such as the shapes world draw every sample independently, so the order does not depend on any
    global RNG; Lightning's distributed sampler splits them under DDP. The LightningModule hands its
    model's transforms in its ``setup`` (:meth:`use_transforms`).

    Args:
        train, val, test: the sources (``class_path`` in YAML); ``val``/``test`` optional.
        batch_size: training batch size.
        eval_batch_size: validation / test batch size.
        num_workers: DataLoader workers (persistent when > 0).
    """

    def __init__(self, train: Source, val: Optional[Source] = None, test: Optional[Source] = None,
                 batch_size: int = 128, eval_batch_size: int = 32, num_workers: int = 0) -> None:
        super().__init__(batch_size, num_workers)
        self.eval_batch_size = eval_batch_size
        seeds = [getattr(s, "seed", None) for s in (train, val, test) if s is not None]
        named = [s for s in seeds if s is not None]
        if len(set(named)) != len(named):
            raise ValueError(f"train / val / test sources must have distinct seeds, got {seeds}")
        self.splits: Dict[str, Source] = {k: v for k, v in (("train", train), ("val", val), ("test", test)) if v is not None}

    def sources(self) -> List[Source]:
        """The train / val / test sources given."""
        return list(self.splits.values())

    def _loader(self, split: str, batch_size: int) -> DataLoader:
        """An in-order loader over ``split``."""
        self.prepare_sources()
        return DataLoader(self.splits[split], batch_size=batch_size, shuffle=False, num_workers=self.num_workers,
                          persistent_workers=self.num_workers > 0, collate_fn=self.transforms.collate())

    def train_dataloader(self) -> DataLoader:
        """Training pairs, ``batch_size`` per batch."""
        return self._loader("train", self.batch_size)

    def val_dataloader(self) -> DataLoader:
        """Validation pairs, ``eval_batch_size`` per batch (none without a ``val`` source)."""
        return self._loader("val", self.eval_batch_size) if "val" in self.splits else []

    def test_dataloader(self) -> DataLoader:
        """Test pairs, ``eval_batch_size`` per batch."""
        return self._loader("test", self.eval_batch_size)
