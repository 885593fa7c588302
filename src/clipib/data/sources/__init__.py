"""clipib data sources: one ``Dataset`` class per source, each built from YAML with its own arguments.

* :class:`~clipib.data.sources.webdataset.ShardDataset`: webdataset shards (LAION-style ``.jpg`` + ``.txt``).
* :mod:`clipib.data.sources.tables`: :class:`TsvDataset` (Conceptual Captions), :class:`CsvDataset`
  (``caption,file_path``), :class:`Flickr8kDataset`, :class:`FolderDataset` (class folders + prompt).
* :class:`~clipib.data.sources.refcoco.RefCocoDataset`: grounding JSON lines with boxes and masks.
* :class:`~clipib.data.sources.synthetic.ShapesDataset`: the synthetic shapes world.

Every source subclasses :class:`~clipib.data.sources.base.Source` (model transforms handed in, keys
excluded, :meth:`~clipib.data.sources.base.Source.prepare` before the first DataLoader).
"""

from clipib.data.sources.base import ModelTransforms, Source
from clipib.data.sources.refcoco import RefCocoDataset
from clipib.data.sources.rows import RowSource, Selection
from clipib.data.sources.synthetic import ShapesDataset
from clipib.data.sources.tables import CsvDataset, Flickr8kDataset, FolderDataset, TsvDataset
from clipib.data.sources.webdataset import ShardDataset

__all__ = [
    "CsvDataset",
    "Flickr8kDataset",
    "FolderDataset",
    "ModelTransforms",
    "RefCocoDataset",
    "RowSource",
    "Selection",
    "ShapesDataset",
    "ShardDataset",
    "Source",
    "TsvDataset",
]
