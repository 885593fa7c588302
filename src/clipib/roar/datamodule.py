"""The data of one ROAR fine-tuning run: an 80/20 split of the evaluated pairs, the training part degraded by a
method's stored maps, the validation part original (M2IB Sec. 4.4, ROAR+).

YAML (``configs/roar/shapes.yaml``)::

    data:
      class_path: clipib.roar.RoarDataModule
      init_args:
        dataset: {class_path: clipib.data.sources.synthetic.ShapesDataset, init_args: {size: 640, seed: 7, split: train}}
        maps: outputs/roar/shapes/maps     # the eval.py run that stored the maps of these pairs
        method: m2ib                       # null: the reference run on undegraded data
        modality: image
        batch_size: 64                     # the global batch, split over processes

``batch_size`` is the *global* batch: each of ``W`` processes loads ``batch_size / W`` pairs, and the
training sampler hands process ``r`` positions ``r, r + W, ...`` of one seeded permutation per epoch, so the
``W`` processes together train on exactly the batches one process would (open_clip's ``ClipLoss`` over the
gathered batch, :class:`clipib.lit.roar_module.ROARModule`): a DDP run gives the single-process score.
"""

from __future__ import annotations

from typing import Any, Dict, List, Optional

import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Subset

from clipib.callbacks.records import index_store
from clipib.data.datamodule import _SourceDataModule
from clipib.data.samplers import UnrepeatedDistributedSampler
from clipib.data.sources.base import Source
from clipib.removal import PAD_ID
from clipib.roar.degraded import DEFAULT_QUANTILE, MODALITIES, DegradedDataset


class Positions(Dataset):
    """Items of ``dataset`` with their position, ``"position"``: the validation loss groups pairs in this order
    whatever the process count."""

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        """Number of items."""
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, index: int) -> Dict[str, Any]:
        """Item ``index`` plus ``"position": index``."""
        return {**self.dataset[index], "position": torch.tensor(index)}


def split_positions(n: int, train_fraction: float, seed: int) -> tuple[List[int], List[int]]:
    """A seeded split of ``range(n)``: ``(train, val)``, ``round(train_fraction * n)`` training positions,
    each part sorted.

    >>> split_positions(5, 0.8, 0)[0] != split_positions(5, 0.8, 1)[0], len(split_positions(10, 0.8, 0)[1])
    (True, 2)
    """
    if not 0.0 < train_fraction < 1.0:
        raise ValueError(f"train_fraction must lie in (0, 1), got {train_fraction}")
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
    cut = round(train_fraction * n)
    return sorted(perm[:cut]), sorted(perm[cut:])


class RoarDataModule(_SourceDataModule):
    """Degraded training pairs and original validation pairs for ROAR+ and the removal curve.

    Args:
        dataset: the pairs the maps were computed on (the same source, size and seed as the eval run).
        maps: that eval run's directory (its attribution store); unused when ``method`` is None.
        method: the method whose maps degrade the training pairs; ``None``: the reference run (no degradation).
        map_seed: the eval seed of the maps.
        modality, fraction, fill, blank_id, ties: :class:`~clipib.roar.degraded.DegradedDataset`'s
            (defaults: M2IB Sec. 4.4, image pixels above the 75th percentile → the image's channel mean;
            tokens above the 50th → padding id 0; ``fraction`` set: that share, the removal curve).
        train_fraction, split_seed: the split (M2IB: 80 % fine-tuning, 20 % validation); ``split_seed`` also
            seeds the per-epoch shuffle of the training pairs.
        batch_size: global training batch (divided over the processes); ``eval_batch_size``: per process.
        num_workers: DataLoader workers (maps are read and removed in them).
    """

    def __init__(self, dataset: Source, maps: Optional[str] = None, method: Optional[str] = None, map_seed: int = 0,
                 modality: str = "image", fraction: Optional[float] = None, fill: str = "mean",
                 blank_id: int = PAD_ID, ties: str = "rank", train_fraction: float = 0.8, split_seed: int = 0,
                 batch_size: int = 64, eval_batch_size: int = 64, num_workers: int = 0) -> None:
        super().__init__(batch_size, num_workers)
        if modality not in MODALITIES:
            raise ValueError(f"modality must be one of {MODALITIES}, got {modality!r}")
        if method is not None and maps is None:
            raise ValueError(f"method {method!r} needs maps: the eval run directory holding its attribution store")
        self.dataset, self.maps, self.method, self.map_seed = dataset, maps, method, map_seed
        self.modality, self.fraction, self.fill, self.blank_id, self.ties = modality, fraction, fill, blank_id, ties
        self.train_fraction, self.split_seed, self.eval_batch_size = train_fraction, split_seed, eval_batch_size
        self.splits: Dict[str, Dataset] = {}

    def sources(self) -> List[Source]:
        """The one source."""
        return [self.dataset]

    @property
    def info(self) -> Dict[str, Any]:
        """What this run degrades: method, modality, fraction (None: M2IB's percentile rule, ``quantile``), fill,
        split sizes."""
        quantile = None if self.fraction is not None else DEFAULT_QUANTILE.get(self.modality)
        sizes = {k: len(v) for k, v in self.splits.items()}  # type: ignore[arg-type]
        return {"method": self.method, "modality": self.modality, "fraction": self.fraction, "quantile": quantile,
                "fill": self.fill,
                "blank_id": self.blank_id, "split_seed": self.split_seed, **{f"{k}_pairs": n for k, n in sizes.items()}}

    def _build(self) -> None:
        if self.splits:
            return
        self.prepare_sources()
        train_pos, val_pos = split_positions(len(self.dataset), self.train_fraction, self.split_seed)
        train: Dataset = Subset(self.dataset, train_pos)
        if self.method is not None:
            index = index_store(self.maps, self.method, self.map_seed)
            train = DegradedDataset(train, index, self.modality, self.fraction, self.fill, self.blank_id, self.ties,
                                    tokenizer=self.transforms.tokenizer)
        self.splits = {"train": train, "val": Positions(Subset(self.dataset, val_pos))}

    def train_dataloader(self) -> DataLoader:
        """Shuffled (seeded per epoch) training pairs, ``batch_size / W`` per process, last partial batch dropped."""
        self._build()
        rank, world = self.rank_world()
        if self.batch_size % world:
            raise ValueError(f"batch_size {self.batch_size} (global) is not divisible by {world} processes")
        data = self.splits["train"]
        if len(data) < self.batch_size:  # type: ignore[arg-type]
            raise ValueError(f"{len(data)} training pairs cannot fill one batch of {self.batch_size}")  # type: ignore[arg-type]
        sampler = DistributedSampler(data, num_replicas=world, rank=rank, shuffle=True, seed=self.split_seed,
                                     drop_last=True)
        return DataLoader(data, batch_size=self.batch_size // world, sampler=sampler, drop_last=True,
                          num_workers=self.num_workers, persistent_workers=self.num_workers > 0,
                          collate_fn=self.transforms.collate())

    def val_dataloader(self) -> DataLoader:
        """Original validation pairs, each exactly once over the processes, with their ``"position"``."""
        self._build()
        rank, world = self.rank_world()
        data = self.splits["val"]
        sampler = UnrepeatedDistributedSampler(data, num_replicas=world, rank=rank)
        return DataLoader(data, batch_size=self.eval_batch_size, sampler=sampler, num_workers=self.num_workers,
                          persistent_workers=self.num_workers > 0, collate_fn=self.transforms.collate())
