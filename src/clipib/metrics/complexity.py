"""Complexity of a map: sparseness (Gini index) and complexity (entropy), model-free.

* :func:`sparseness` - Chalasani et al. 2020 ("Concise explanations of neural networks using adversarial
  training"), the Gini index of the absolute map (Hurley & Rickard's form): with ``c_1 <= ... <= c_n`` the sorted
  ``|a_i|``, ``G = sum_k (2k - n - 1) c_k / (n sum_k c_k)``; 0 for a uniform map, ``1 - 1/n`` for a one-hot map.
  Higher = sparser (more concise) - higher is better in Chalasani's reading.
* :func:`complexity` - Bhatt et al. 2020 ("Evaluating and aggregating feature-based model explanations"), the
  Shannon entropy (nats) of the fractional contribution ``p_i = |a_i| / sum_j |a_j|``; ``log n`` for a uniform
  map, 0 for a one-hot map. Lower = less complex (lower is better). ``normalized=True`` divides by ``log n``
  (clipib's option, so image and text values share a [0, 1] scale). The entropy is
  :func:`clipib.metrics.mismatch.map_entropy` of ``|a|``.

Both are the definitions of Quantus' ``Sparseness`` and ``Complexity``. **All-zero maps** (an eval map is
min-max normalised, so every constant method map is all zero) have no distribution: NaN, counted as skipped -
never the uniform map's value. Text: the content tokens strictly between SOT and EOT.

:class:`ComplexityMetrics` is the eval metric (registry name ``complexity``; values ``{m}_sparseness`` and
``{m}_complexity`` for m = image (``attr.image``, pixel resolution) and text (``attr.text``)). Cost: no model pass.
"""
from __future__ import annotations

import math
from typing import Any, Dict

import torch
from torch import Tensor

from clipib.attribution.base import Attribution
from clipib.metrics.base import AttributionMetric, Batch
from clipib.metrics.mismatch import map_entropy
from clipib.models.split import SplitCLIP

__all__ = ["sparseness", "complexity", "ComplexityMetrics"]


def _abs_rows(maps: Tensor, valid: Tensor | None) -> tuple[Tensor, Tensor]:
    """``(|maps| [B, N] float64, valid [B, N] bool)``; maps must be finite."""
    x = maps.flatten(1).double().abs()  # [B, N]
    if not torch.isfinite(x).all():
        raise ValueError("maps contain NaN or inf")
    v = torch.ones_like(x, dtype=torch.bool) if valid is None else valid.flatten(1).bool()
    return torch.where(v, x, torch.zeros_like(x)), v


def sparseness(maps: Tensor, valid: Tensor | None = None) -> Tensor:
    """Gini index of ``|maps|`` ``[B, ...] -> [B]`` float64 over ``valid`` entries; NaN for an all-zero map.

    Example:
        >>> sparseness(torch.tensor([[1.0, 1.0, 1.0, 1.0], [0.0, 0.0, 0.0, 2.0], [0.0, 0.0, 0.0, 0.0]]))
        tensor([0.0000, 0.7500,    nan], dtype=torch.float64)
    """
    x, v = _abs_rows(maps, valid)
    srt = torch.where(v, x, torch.full_like(x, math.nan)).sort(dim=1).values  # [B, N], invalid (NaN) last
    n = v.sum(1, keepdim=True).double()  # [B, 1]
    k = torch.arange(1, x.shape[1] + 1, device=x.device, dtype=torch.float64)[None]  # [1, N]
    terms = torch.where(k <= n, (2 * k - n - 1) * srt.nan_to_num(0.0), torch.zeros_like(srt))
    total = x.sum(1)  # [B]
    g = terms.sum(1) / (n[:, 0] * total).clamp_min(1e-300)
    return torch.where(total > 0, g, torch.full_like(g, math.nan))


def complexity(maps: Tensor, valid: Tensor | None = None, normalized: bool = False) -> Tensor:
    """Entropy (nats) of ``p = |a| / sum |a|`` ``[B, ...] -> [B]`` float64; NaN for an all-zero map.

    ``normalized`` divides by ``log(n_valid)`` (values in [0, 1]).

    Example:
        >>> complexity(torch.tensor([[1.0, 1.0, 1.0, 1.0], [0.0, 0.0, 0.0, 2.0], [0.0, 0.0, 0.0, 0.0]]))
        tensor([1.3863, 0.0000,    nan], dtype=torch.float64)
    """
    x, v = _abs_rows(maps, valid)
    h = map_entropy(x, v, normalized=normalized)  # [B] float64
    return torch.where(x.sum(1) > 0, h, torch.full_like(h, math.nan))


class ComplexityMetrics(AttributionMetric):
    """Sparseness (Gini, Chalasani et al. 2020) and complexity (entropy, Bhatt et al. 2020) of each map.

    Values ``{m}_sparseness`` (higher = sparser) and ``{m}_complexity`` (lower = simpler), m = image, text.

    Args:
        normalized: divide the entropy by ``log n`` (default False: Bhatt's nats).
        n_seeds: number of seeds aggregated.

    Example:
        >>> metric = ComplexityMetrics()
        >>> maps = torch.zeros(2, 4, 4); maps[0, 0, 0] = 1.0
        >>> {k: v.tolist() for k, v in metric.update(None, {}, Attribution(image=maps), "image").items()}
        {'image_sparseness': [0.9375, nan], 'image_complexity': [0.0, nan]}
        >>> float(metric.compute()["image_sparseness"]["skipped"])
        1.0
    """

    VALUES = {"image": ("image_sparseness", "image_complexity"), "text": ("text_sparseness", "text_complexity")}
    higher_is_better = None

    def __init__(self, normalized: bool = False, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.normalized = normalized

    def score(self, clip: SplitCLIP, batch: Batch, attr: Attribution, modality: str) -> Dict[str, Tensor]:
        """``{m}_sparseness`` and ``{m}_complexity`` per sample (NaN for an all-zero map)."""
        if modality == "image":
            maps, valid = attr.image, None
        else:
            maps, valid = attr.text, clip.text.span_mask(batch["ids"], special=False)
        return {f"{modality}_sparseness": sparseness(maps, valid),
                f"{modality}_complexity": complexity(maps, valid, self.normalized)}
