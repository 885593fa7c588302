"""What every clipib data source is: a torch ``Dataset`` built from its own YAML arguments, that receives the
model's transforms and the keys to leave out before its first item is read.

A source's life (driven by :class:`clipib.data.datamodule.EvalDataModule` / ``TrainDataModule``)::

    source = ShardDataset(shards="…/{00000..00009}.tar")   # from YAML: only its own arguments
    source.use_transforms(ModelTransforms.from_clip(clip))  # the loaded model's preprocess / tokenizer / scorer
    source.use_run_seeds([42, 43])                          # the run seeds (per-run samples, Selection.resample)
    source.exclude({"00003/000017", …})                     # resumed run: finished keys, never decoded
    source.prepare(rank, world_size, batch_size, num_workers)  # read the table / split the shards (once)
    DataLoader(source, collate_fn=ClipCollate(...))

Items follow :mod:`clipib.data.common` (samples or skip markers).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, Dict, FrozenSet, Iterable, Optional, Sequence, Tuple

from torch.utils.data import Dataset

from clipib.data.common import ClipCollate, Preprocess, Score, Tokenizer, input_size


@dataclass(frozen=True)
class ModelTransforms:
    """What a source needs from the model: ``preprocess`` (PIL -> Tensor[3, H, W]), ``tokenizer``
    (``list[str] -> LongTensor[B, ctx]``, on the CPU: it runs in DataLoader workers), the input size
    ``(H, W)`` and, for CLIP-based row selection, a pair scorer (:mod:`clipib.data.selection`)."""

    preprocess: Preprocess
    tokenizer: Tokenizer
    image_size: Tuple[int, int]
    score: Optional[Score] = None

    @classmethod
    def from_clip(cls, clip: Any) -> "ModelTransforms":
        """The transforms of a loaded :class:`clipib.SplitCLIP` and its cosine scorer.

        The tokenizer is the model's open_clip tokenizer: ``clip.tokenize`` moves ids to the model's device,
        which DataLoader workers must not do.
        """
        from clipib.data.selection import clip_scorer

        return cls(clip.preprocess, clip.tokenizer, tuple(clip.image_size), clip_scorer(clip))

    @classmethod
    def from_config(cls, model: str) -> "ModelTransforms":
        """Transforms of a model config (open_clip name, JSON path, ``clipib-shapes``) without weights."""
        from clipib.models.loading import load_transforms

        preprocess, tokenizer = load_transforms(model)
        return cls(preprocess, tokenizer, input_size(preprocess))

    @classmethod
    def of(cls, preprocess: Preprocess, tokenizer: Tokenizer, score: Optional[Score] = None) -> "ModelTransforms":
        """Transforms from a torchvision ``preprocess`` (its output size read from its resize / crop)."""
        return cls(preprocess, tokenizer, input_size(preprocess), score)

    def collate(self) -> ClipCollate:
        """The batch collate for these transforms."""
        return ClipCollate(self.tokenizer, self.image_size)


class Source(Dataset):
    """Base of every clipib data source (map-style or iterable).

    Subclasses take only their own arguments in ``__init__`` (that is their YAML) and must not touch the
    file system there (a config is parsed and printed without its data). They read ``self.transforms``
    and ``self.excluded`` from :meth:`prepare` on; ``self.info`` reports what selection did.
    """

    transforms: Optional[ModelTransforms] = None
    excluded: FrozenSet[str] = frozenset()
    run_seeds: Optional[Tuple[int, ...]] = None

    def use_run_seeds(self, seeds: Sequence[int]) -> None:
        """The run seeds of the evaluation (before :meth:`prepare`): a ``sample`` with ``resample`` draws one
        sample per run seed (:class:`~clipib.data.sources.rows.Selection`). Unknown (``None``): one draw."""
        self.run_seeds = tuple(int(s) for s in seeds)

    def use_transforms(self, transforms: ModelTransforms) -> None:
        """Use the model's transforms (before :meth:`prepare`)."""
        self.transforms = transforms

    def __getstate__(self) -> Dict[str, Any]:
        """Pickled for DataLoader workers without the scorer: it holds the model, and workers only decode
        (rows are selected in :meth:`prepare`, in the main process)."""
        state = self.__dict__.copy()
        if self.transforms is not None and self.transforms.score is not None:
            state["transforms"] = replace(self.transforms, score=None)
        return state

    def exclude(self, keys: Iterable[str]) -> None:
        """Leave out the samples (and skips) with these keys: never decoded, yielded nor reported."""
        self.excluded = frozenset(self.excluded | set(keys))

    def prepare(self, rank: Optional[int], world_size: Optional[int], batch_size: int, num_workers: int) -> None:
        """Get ready for this process (``rank`` of ``world_size``; ``None``: unknown, no trainer): read rows,
        select, split. Called once before the first DataLoader; nothing to do by default."""

    @property
    def info(self) -> Dict[str, Any]:
        """What the source selected (row counts, partition bounds, …); empty by default."""
        return getattr(self, "_info", {})

    def need_transforms(self) -> ModelTransforms:
        """``self.transforms``, or a clear error when the model never handed them."""
        if self.transforms is None:
            raise RuntimeError(
                f"{type(self).__name__} has no model transforms: call datamodule.use_model(clip) "
                "(the LightningModule does it in setup) or source.use_transforms(...) first"
            )
        return self.transforms
