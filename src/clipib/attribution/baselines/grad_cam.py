"""Grad-CAM (Selvaraju et al., ICCV 2017) on the tokens of a transformer block, for CLIP.

Activations ``A`` = the residual stream after ``layer`` blocks (``tower.prefix(x, layer)``, ``[B, T, D]``);
``y`` = cos(embedding, other modality's clean embedding). Grad-CAM's neuron weights are the gradients
averaged over the spatial positions, here the tokens: ``w_c = mean_t ∂y/∂A_{t,c}``; the map is
``ReLU(Σ_c w_c A_{t,c})`` per token. Image: the average and the map run over the patch tokens (CLS dropped,
as ViT Grad-CAM reshapes the patch tokens to the grid; register tokens are dropped the same way); text: over each caption's own SOT..EOT, so padding
of shorter captions in a batch changes nothing.

Default layer: ``n_layers − 1``, the input of the last block, the usual ViT Grad-CAM target
(pytorch-grad-cam's ViT example hooks ``blocks[-1].norm1``, i.e. this stream after the block's LayerNorm).
The output of the last block (``layer = n_layers``) gives an all-zero image map: only CLS is pooled, so the
patch tokens there have no gradient. NIB's repository's "gradcam" (per-token gradient × activation at
M2IB's layer) is a different method and is not this class.
"""

from __future__ import annotations

from typing import List, Optional

import torch
from torch import Tensor

from clipib.attribution.base import Attributor, Scores
from clipib.models.split import SplitCLIP, Tower, fit_rows


class GradCAM(Attributor):
    """Grad-CAM on a block's tokens: ``ReLU(Σ_c mean_t(∂cos/∂A_{t,c}) · A_{t,c})``, non-negative.

    Args:
        clip: the model.
        layer: activations = residual stream after ``layer`` blocks; None = ``n_layers − 1`` (the input of the
            last block) in each tower.
        seed: unused (deterministic); kept for the common constructor.
    """

    name = "grad_cam"

    def __init__(self, clip: SplitCLIP, layer: Optional[int] = None, seed: int = 0) -> None:
        super().__init__(clip, seed=seed, layer=layer)

    def layer_for(self, tower: Tower) -> int:
        """``self.layer``, or the input of the tower's last block."""
        if self.layer is None:
            return tower.n_layers - 1
        return super().layer_for(tower)

    def cam(self, tower: Tower, x: Tensor, target: Tensor, keep: Tensor) -> Tensor:
        """Grad-CAM scores ``[B, T]`` of ``tower`` on inputs ``x``, averaging over tokens where ``keep`` ``[B, T]``.

        Positions outside ``keep`` get 0.
        """
        k = self.layer_for(tower)
        with torch.no_grad():
            h = tower.prefix(x, k)  # [B, T, D]
        h.requires_grad_(True)
        score = (tower.suffix(h, k, x) * target).sum(-1)  # [B]
        (grad,) = torch.autograd.grad(score.sum(), h)  # [B, T, D]
        keep = keep.to(h.dtype)[..., None]  # [B, T, 1]
        weights = (grad * keep).sum(1) / keep.sum(1)  # [B, D]
        cam = torch.relu((h.detach() * weights[:, None]).sum(-1))  # [B, T]
        return cam * keep[..., 0]

    def image_scores(self, images: Tensor, ids: Tensor, target: Tensor, generators: List[torch.Generator]) -> Scores:
        tower = self.clip.image
        b, t = images.shape[0], tower.n_prefix + self.clip.grid[0] * self.clip.grid[1]
        keep = torch.ones(b, t, dtype=torch.bool, device=images.device)
        keep[:, : tower.n_prefix] = False  # class / register tokens: the average runs over the patch tokens
        return tower.to_grid(self.cam(tower, images, target, keep)), {}

    def text_scores(self, images: Tensor, ids: Tensor, target: Tensor, generators: List[torch.Generator]) -> Scores:
        text = self.clip.text
        keep = fit_rows(text.span_mask(ids), text.stream_length(ids))  # [B, T]: the caption's rows
        return self.cam(text, ids, target, keep), {}
