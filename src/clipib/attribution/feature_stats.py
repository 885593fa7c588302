"""IBA-style feature statistics: the per-channel mean and std of a tower's residual stream at one layer.

IBA (Schulz et al. 2020) estimates the mean and std of the cut layer's features over ~10k samples with
Welford's algorithm, clamps the std at ``min_std = 0.01``, and runs its bottleneck on the normalised features,
drawing the noise from the feature distribution (REFERENCE_NOTES §1). M2IB's reference code does not (its σ²
is unused; noise N(0, I) on the raw stream). :class:`clipib.M2IB` offers IBA's rule as ``feature_stats=<path>``.

Differences from IBA, by necessity: IBA keeps one mean / std per element of a CNN feature map (channel ×
position); a text tower's positions vary with the caption, so clipib keeps one per **channel**, pooled over
the valid tokens (image: every token, CLS included; text: SOT..EOT) of every sample. IBA's "active neurons"
mask (features that are non-zero in < 1 % of samples, meant for post-ReLU maps) has no counterpart on a
residual stream and is not applied.

Usage::

    stats = estimate(clip, loader, modality="both", max_samples=5000)   # loader: eval batches or tensors
    stats.save("stats.safetensors")
    M2IB(clip, feature_stats="stats.safetensors")

Files are safetensors (tensors ``<modality>.mean`` / ``<modality>.std``, float32; metadata: format, layers,
counts, model name); nothing is unpickled.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Iterable, Literal, Optional, Tuple, Union

import torch
from torch import Tensor

from clipib.attribution.base import scaled_layer
from clipib.models.split import SplitCLIP, Tower

FORMAT = "clipib.feature_stats/1"
MIN_STD = 0.01
"""IBA's floor on the std (``min_std``)."""
MODALITIES = ("image", "text")


class Welford:
    """Streaming per-channel mean and variance of rows ``[N, D]`` in float64.

    Each :meth:`update` merges a batch's own mean and sum of squared deviations into the running ones (the
    batched form of Welford's update, Chan et al. 1979), so the result does not depend on how rows are batched.
    """

    def __init__(self, width: int) -> None:
        self.n = 0
        self.mean = torch.zeros(width, dtype=torch.float64)
        self.m2 = torch.zeros(width, dtype=torch.float64)

    def update(self, rows: Tensor) -> None:
        """Add rows ``[N, D]``."""
        rows = rows.detach().to("cpu", torch.float64)
        n_b = rows.shape[0]
        if n_b == 0:
            return
        mean_b = rows.mean(0)
        m2_b = ((rows - mean_b) ** 2).sum(0)
        n = self.n + n_b
        delta = mean_b - self.mean
        self.mean = self.mean + delta * (n_b / n)
        self.m2 = self.m2 + m2_b + delta**2 * (self.n * n_b / n)
        self.n = n

    @property
    def std(self) -> Tensor:
        """Sample std (``n − 1``), ``[D]``; 0 with fewer than two rows."""
        return (self.m2 / max(self.n - 1, 1)).sqrt()


@dataclass
class TowerStats:
    """Statistics of one tower: ``mean`` / ``std`` ``[D]`` (std unclamped) over ``count`` token vectors of
    ``samples`` inputs at ``layer``."""

    layer: int
    mean: Tensor
    std: Tensor
    count: int
    samples: int


@dataclass
class FeatureStats:
    """Per-channel feature statistics of the image and/or text tower (``towers`` keyed by modality)."""

    towers: Dict[str, TowerStats] = field(default_factory=dict)
    model: str = ""

    def for_tower(self, modality: str, layer: int, width: Optional[int] = None,
                  min_std: float = MIN_STD) -> Tuple[Tensor, Tensor]:
        """``(mean [D], std [D])`` for the bottleneck at ``layer`` of ``modality``'s tower, std clamped ≥ ``min_std``.

        Raises ValueError when the statistics lack that tower, were estimated at another layer, or have another width.
        """
        if modality not in self.towers:
            raise ValueError(f"feature statistics hold {sorted(self.towers) or 'no tower'}, not {modality!r}: "
                             f"estimate them with modality={modality!r} or 'both'")
        st = self.towers[modality]
        if st.layer != layer:
            raise ValueError(f"{modality} feature statistics were estimated at layer {st.layer}, the bottleneck "
                             f"is at layer {layer}")
        if width is not None and st.mean.shape != (width,):
            raise ValueError(f"{modality} feature statistics have {st.mean.shape[0]} channels, the layer has {width}")
        return st.mean.float(), st.std.float().clamp_min(min_std)

    def save(self, path: Union[str, Path]) -> Path:
        """Write a safetensors file; returns its path."""
        from safetensors.torch import save_file

        path = Path(path)
        tensors, meta = {}, {"format": FORMAT, "model": self.model}
        for m, st in self.towers.items():
            tensors[f"{m}.mean"] = st.mean.float().contiguous()
            tensors[f"{m}.std"] = st.std.float().contiguous()
            meta.update({f"{m}.layer": str(st.layer), f"{m}.count": str(st.count), f"{m}.samples": str(st.samples)})
        save_file(tensors, str(path), metadata=meta)
        return path

    @classmethod
    def load(cls, path: Union[str, Path]) -> "FeatureStats":
        """Read a file written by :meth:`save`. Raises FileNotFoundError / ValueError with one line on a bad path."""
        from safetensors import safe_open

        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"feature_stats: no such file: {path}")
        try:
            with safe_open(str(path), framework="pt") as f:
                meta = f.metadata() or {}
                tensors = {k: f.get_tensor(k) for k in f.keys()}
        except Exception as e:  # safetensors raises its own error types for a file that is not one of its own
            raise ValueError(f"feature_stats: {path} is not a safetensors file ({type(e).__name__})") from None
        if meta.get("format") != FORMAT:
            raise ValueError(f"feature_stats: {path} is not a clipib feature-statistics file (format "
                             f"{meta.get('format')!r}, expected {FORMAT!r})")
        towers = {}
        for m in MODALITIES:
            if f"{m}.mean" in tensors:
                towers[m] = TowerStats(int(meta[f"{m}.layer"]), tensors[f"{m}.mean"], tensors[f"{m}.std"],
                                       int(meta[f"{m}.count"]), int(meta[f"{m}.samples"]))
        return cls(towers, meta.get("model", ""))


def resolve(feature_stats: Union[str, Path, FeatureStats, None]) -> Optional[FeatureStats]:
    """A :class:`FeatureStats` from a path or an instance (None stays None)."""
    if feature_stats is None or isinstance(feature_stats, FeatureStats):
        return feature_stats
    if isinstance(feature_stats, (str, Path)):
        return FeatureStats.load(feature_stats)
    raise TypeError(f"feature_stats must be a path or a FeatureStats, got {type(feature_stats).__name__}")


def _inputs(batch: Any) -> Tuple[Optional[Tensor], Optional[Tensor]]:
    """``(images, ids)`` of an eval batch (mapping), an ``(images, ids)`` pair, or one tensor."""
    if isinstance(batch, dict) or hasattr(batch, "keys"):
        return batch.get("image"), batch.get("ids")
    if isinstance(batch, (tuple, list)) and len(batch) == 2:
        return batch[0], batch[1]
    if isinstance(batch, Tensor):
        return (batch, None) if batch.is_floating_point() else (None, batch)
    raise TypeError(f"batches must yield mappings with 'image' / 'ids', (images, ids) pairs or tensors, "
                    f"got {type(batch).__name__}")


def estimate(
    clip: SplitCLIP,
    batches: Iterable[Any],
    layer: Optional[int] = None,
    modality: Literal["image", "text", "both"] = "both",
    max_samples: Optional[int] = None,
) -> FeatureStats:
    """Welford estimate of the per-channel mean / std of the residual stream after ``layer`` blocks.

    Args:
        clip: the model.
        batches: eval batches (mappings with ``image`` and/or ``ids``), ``(images, ids)`` pairs, or tensors
            (float ``[B, 3, H, W]`` images, integer ``[B, ctx]`` ids), preprocessed as the model takes them.
        layer: the bottleneck's layer; None = M2IB's default (10 of 12, scaled to each tower, as
            :class:`clipib.M2IB` places it).
        modality: which towers.
        max_samples: stop after this many inputs per tower (IBA used ~10,000); None = every batch.
    """
    if modality not in ("image", "text", "both"):
        raise ValueError(f"modality must be 'image', 'text' or 'both', got {modality!r}")
    if max_samples is not None and max_samples < 1:
        raise ValueError("max_samples must be >= 1 or None")
    wanted = MODALITIES if modality == "both" else (modality,)
    towers: Dict[str, Tower] = {"image": clip.image, "text": clip.text}
    layers = {m: scaled_layer(10, 12, towers[m].n_layers) if layer is None else layer for m in wanted}
    for m in wanted:
        if not 0 <= layers[m] <= towers[m].n_layers:
            raise ValueError(f"layer={layers[m]} outside 0..{towers[m].n_layers} of the {m} tower")
    acc: Dict[str, Welford] = {}
    seen = {m: 0 for m in wanted}
    for batch in batches:
        images, ids = _inputs(batch)
        for m, x in (("image", images), ("text", ids)):
            if m not in wanted or x is None:
                continue
            if max_samples is not None:
                x = x[: max_samples - seen[m]]
            if x.shape[0] == 0:
                continue
            x = x.to(clip.device, clip.dtype) if m == "image" else x.to(clip.device)
            with torch.no_grad():
                h = towers[m].prefix(x, layers[m])  # [B, T, D]
            if m == "text":
                valid = clip.text.span_mask(x)[:, : h.shape[1]]  # SOT..EOT
            else:
                valid = torch.ones(h.shape[:2], dtype=torch.bool, device=h.device)  # every token
            acc.setdefault(m, Welford(h.shape[-1])).update(h[valid])
            seen[m] += x.shape[0]
        if max_samples is not None and all(seen[m] >= max_samples for m in wanted):
            break
    missing = [m for m in wanted if seen[m] == 0]
    if missing:
        raise ValueError(f"estimate: the batches held no {' or '.join(missing)} inputs")
    out = {m: TowerStats(layers[m], acc[m].mean.float(), acc[m].std.float(), acc[m].n, seen[m]) for m in wanted}
    return FeatureStats(out, getattr(clip, "name", ""))
