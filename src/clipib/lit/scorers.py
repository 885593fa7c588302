"""Scorers: turn an attribution of a batch into per-sample metric values for the eval pipeline.

A scorer is built from its config settings, declares the value names it produces per modality
(``names(modality)``) and returns ``{name: Tensor[B]}`` from ``(clip, batch, attribution, modality)``.
The values are aggregated by :class:`~clipib.metrics.aggregate.SeedMeanStd` (mean ± std over seeds) and
written to the per-sample records. The kernels live in :mod:`clipib.metrics`.
"""

from __future__ import annotations

from typing import Any, Callable, Dict, List, Protocol

import torch
from torch import Tensor

from clipib.attribution import Attribution
from clipib.models.split import SplitCLIP


class Scorer(Protocol):
    """Interface of a scorer."""

    def names(self, modality: str) -> List[str]:
        """The value names produced for ``modality``."""

    def __call__(self, clip: SplitCLIP, batch: Dict[str, Any], attr: Attribution, modality: str) -> Dict[str, Tensor]:
        """Per-sample values ``{name: [B]}``."""


SCORERS: Dict[str, Callable[..., Scorer]] = {}


def register_scorer(name: str):
    """Class decorator adding a scorer to :data:`SCORERS`."""

    def wrap(cls):
        SCORERS[name] = cls
        return cls

    return wrap


@register_scorer("similarity")
class Similarity:
    """The pair's cosine similarity (a sanity column; recorded with the image modality)."""

    def names(self, modality: str) -> List[str]:
        return ["cos"] if modality == "image" else []

    def __call__(self, clip, batch, attr, modality):
        if modality != "image":
            return {}
        with torch.no_grad():
            return {"cos": clip.similarity(batch["image"], batch["ids"])}


# the metric suite registers its scorers on import (kept last: it imports register_scorer from here)
from clipib.lit import metric_scorers as _metric_scorers  # noqa: E402,F401
