"""M2IB: Multi-Modal Information Bottleneck attribution (Wang, Rudner, Wilson, NeurIPS 2023).

Defaults are the paper's and its reference code's (Sec. 4.1, App. A; REFERENCE_NOTES §1): β = 0.1 for both
towers, 10 Adam steps at lr 1, 10 noise copies per step, α initialised to 5, the bottleneck on the output of
0-based block 9 of 12 (clipib ``layer=10``), noise N(0, I) on the un-normalised hidden state (the paper's σ²
has no effect in the reference code). The image map is the capacity without CLS on the patch grid,
bilinearly resized and min-max normalised; the text map one capacity per SOT..EOT token, min-max.

Noise: with ``seeds=[s]`` a pair draws from a CPU generator seeded with ``s`` in the official order and shapes
(image map first, ``[copies, T, D]`` per step, then the text map ``[copies, L, D]`` per step), so
``attribute(x, ids, "both", seeds=[s])`` reproduces the official code run after ``torch.manual_seed(s)``.

Paper options beyond the reference code: ``sigma`` — the paper's σ (eqs. 4-5; App. A grid σ² ∈ {1, 0.1, 0.01},
i.e. ``sigma`` ∈ {1, 0.316, 0.1}), the std of the bottleneck noise, ``z = λh + σ(1−λ)ε``, with the KL against
the prior N(0, 1) (the reference code stores σ² and never uses it: ``sigma=1``); ``feature_stats`` — IBA's
per-channel feature normalisation (:mod:`clipib.attribution.feature_stats`), which the paper builds on and the
reference code drops.
"""

from __future__ import annotations

from pathlib import Path
from typing import Dict, List, Optional, Tuple, Union

import torch
from torch import Tensor

from clipib.attribution.base import Attributor, Scores
from clipib.attribution.bottleneck import Bottleneck, BottleneckResult
from clipib.attribution.feature_stats import FeatureStats, resolve
from clipib.attribution.precision import check_precision
from clipib.models.split import SplitCLIP, Tower


class M2IB(Attributor):
    """Multi-modal information bottleneck: loss ``β·KL − cos`` per pair, map = last KL summed over channels.

    Args:
        clip: the model.
        layer: bottleneck position (residual stream after ``layer`` blocks); None = the paper's 10 of 12,
            scaled to each tower's depth.
        beta: compression weight β (paper: 0.1; App. A grid {1, 0.1, 0.01}).
        steps, lr, copies: optimisation (paper: 10, 1.0, 10).
        seed: noise seed of every pair when ``attribute`` gets no ``seeds``.
        alpha_init: initial α (reference: 5).
        noise: ``"official"`` (the CPU stream above, default) or ``"device"`` (per-pair generators on the
            model's device: no per-step host-to-device copy; agrees with the default as two seeds agree).
        internal_batch_size: most rows (pairs × copies) per suffix pass, bounding memory; None = all.
        precision: ``"fp32"`` (default), ``"tf32"`` or ``"bf16"`` (:mod:`clipib.attribution.precision`).
        pooled_last_block: run the last block at the pooled row only (default; the same embedding up to float
            rounding, fewer FLOPs: the rows the head never reads are skipped). False = the full last block.
        sigma: σ, the std of the bottleneck noise (paper eqs. 4-5; App. A grid over σ² = {1, 0.1, 0.01}); 1 = the
            reference code.
        feature_stats: None (default, the reference: noise N(0, I) on the raw stream), or a
            :class:`~clipib.attribution.feature_stats.FeatureStats` / the path of one saved with ``.save``: IBA's
            rule — the bottleneck on ``(h − μ)/s`` per channel, noise from N(μ, s²), std clamped ≥ 0.01. Its
            layers must be the bottleneck's.
        record_grad_norm: add ``{image,text}_grad_norm`` (mean over the updates of the pre-clip L2 norm of
            ∂loss/∂α per pair), ``_grad_norm_max`` and ``_clipped`` (fraction of clipped updates; M2IB has no
            clip: 0) to the scalars.
    """

    name = "m2ib"

    PAPER_LAYER, PAPER_DEPTH = 10, 12

    def __init__(
        self,
        clip: SplitCLIP,
        layer: Optional[int] = None,
        beta: float = 0.1,
        steps: int = 10,
        lr: float = 1.0,
        copies: int = 10,
        seed: int = 0,
        alpha_init: float = 5.0,
        noise: str = "official",
        internal_batch_size: Optional[int] = None,
        precision: str = "fp32",
        pooled_last_block: bool = True,
        sigma: float = 1.0,
        feature_stats: Union[str, Path, FeatureStats, None] = None,
        record_grad_norm: bool = False,
    ) -> None:
        super().__init__(clip, seed=seed, layer=layer)
        self.beta = beta
        self.precision = check_precision(precision)
        self.bottleneck = Bottleneck(steps=steps, lr=lr, copies=copies, alpha_init=alpha_init, noise=noise,
                                     internal_batch_size=internal_batch_size, pooled_last_block=pooled_last_block,
                                     sigma=sigma)
        self.feature_stats = resolve(feature_stats)
        self.record_grad_norm = record_grad_norm

    def objective(self, emb: Tensor, target: Tensor, kl: Tensor) -> Tensor:
        """``β·KL − mean_copies cos(emb, target)`` per pair."""
        return self.beta * kl - (emb * target[:, None]).sum(-1).mean(1)

    def _scalars(self, modality: str, res: BottleneckResult) -> Dict[str, Tensor]:
        out = {f"{modality}_{key}": getattr(res, key) for key in ("kl", "fit", "loss")}
        if self.record_grad_norm:
            out.update(grad_scalars(modality, res))
        return out

    def _stats(self, modality: str, tower: Tower) -> Optional[Tuple[Tensor, Tensor]]:
        if self.feature_stats is None:
            return None
        return self.feature_stats.for_tower(modality, self.layer_for(tower))  # the bottleneck checks the width

    def image_scores(self, images: Tensor, ids: Tensor, target: Tensor, generators: List[torch.Generator]) -> Scores:
        tower = self.clip.image
        res = self.bottleneck.run(tower, images, self.layer_for(tower), target, generators, self.objective,
                                  stats=self._stats("image", tower))
        return self.clip.image.to_grid(res.capacity), self._scalars("image", res)  # prefix tokens dropped: [B, gh, gw]

    def text_scores(self, images: Tensor, ids: Tensor, target: Tensor, generators: List[torch.Generator]) -> Scores:
        tower = self.clip.text
        valid = self.clip.text.span_mask(ids)
        res = self.bottleneck.run(tower, ids, self.layer_for(tower), target, generators, self.objective, valid,
                                  stats=self._stats("text", tower))
        return res.capacity, self._scalars("text", res)  # [B, L]


def grad_scalars(modality: str, res: BottleneckResult) -> Dict[str, Tensor]:
    """``{modality}_grad_norm`` (mean pre-clip gradient norm over the updates), ``_grad_norm_max``, ``_clipped``."""
    return {f"{modality}_grad_norm": res.grad_norm_mean, f"{modality}_grad_norm_max": res.grad_norm_max,
            f"{modality}_clipped": res.clipped}
