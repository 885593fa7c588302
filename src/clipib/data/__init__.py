"""clipib data: DataModules over one source class per data source (see :mod:`clipib.data.datamodule`)."""

from clipib.data.common import ClipCollate, PairDataset, decode_caption, decode_image
from clipib.data.datamodule import EvalDataModule, TrainDataModule
from clipib.data.samplers import UnrepeatedDistributedSampler
from clipib.data.sources import (
    CsvDataset,
    Flickr8kDataset,
    FolderDataset,
    ModelTransforms,
    RefCocoDataset,
    Selection,
    ShapesDataset,
    ShardDataset,
    Source,
    TsvDataset,
)
from clipib.data.sources.refcoco import ResizeCrop, read_refcoco
from clipib.data.sources.tables import read_csv, read_flickr8k, read_folders, read_tsv
from clipib.data.sources.webdataset import expand_shards

__all__ = [
    "ClipCollate",
    "CsvDataset",
    "EvalDataModule",
    "Flickr8kDataset",
    "FolderDataset",
    "ModelTransforms",
    "PairDataset",
    "RefCocoDataset",
    "ResizeCrop",
    "Selection",
    "ShapesDataset",
    "ShardDataset",
    "Source",
    "TrainDataModule",
    "TsvDataset",
    "UnrepeatedDistributedSampler",
    "decode_caption",
    "decode_image",
    "expand_shards",
    "read_csv",
    "read_flickr8k",
    "read_folders",
    "read_refcoco",
    "read_tsv",
]
