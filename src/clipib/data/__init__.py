"""clipib data: evaluation sources yielding the clipib batch contract (see :mod:`clipib.data.datamodule`)."""

from clipib.data.common import ClipCollate, decode_caption, decode_image, resolve_transforms
from clipib.data.datamodule import ClipDataModule
from clipib.data.refcoco import GroundingDataset, ResizeCrop, read_refcoco
from clipib.data.samplers import UnrepeatedDistributedSampler
from clipib.data.tables import PairDataset, read_csv, read_flickr8k, read_folders, read_tsv
from clipib.data.webdataset import ShardDataset, expand_shards

__all__ = [
    "ClipCollate",
    "ClipDataModule",
    "GroundingDataset",
    "PairDataset",
    "ResizeCrop",
    "ShardDataset",
    "UnrepeatedDistributedSampler",
    "decode_caption",
    "decode_image",
    "expand_shards",
    "read_csv",
    "read_flickr8k",
    "read_folders",
    "read_refcoco",
    "read_tsv",
    "resolve_transforms",
]
