"""The synthetic "shapes" world: the generator (:mod:`.world`, numpy + PIL only), the clipib source
(:mod:`.dataset`) and the webdataset shard writer / reader (:mod:`.shards`)."""

from clipib.data.sources.synthetic.dataset import ShapesDataset, WordTokens, sample_to_item
from clipib.data.sources.synthetic.shards import read_shards, write_shards
from clipib.data.sources.synthetic.world import (
    COLOURS,
    IMAGE_SIZE,
    PAIR_INDEX,
    PAIRS,
    SHAPES,
    TEMPLATES,
    ShapeObject,
    ShapesSample,
    generate_sample,
)

__all__ = [
    "COLOURS",
    "IMAGE_SIZE",
    "PAIRS",
    "PAIR_INDEX",
    "SHAPES",
    "TEMPLATES",
    "ShapeObject",
    "ShapesDataset",
    "ShapesSample",
    "WordTokens",
    "generate_sample",
    "read_shards",
    "sample_to_item",
    "write_shards",
]
