"""LeGrad (Bousselham, Boggust, Chaybouti, Strobelt, Kuehne; ICCV 2025, arXiv 2404.03214), image side.

LeGrad explains how each layer *forms* the feature that matches the text: for every chosen block ``l`` it
reads the layer's tokens out as an embedding (logit-lens style), scores it against the text, and takes the
gradient of that score with respect to the block's own attention map as the explanation signal:

* ``z_l`` = residual stream after block ``l`` (``tower.run(h_l, l, l + 1)``);
* ``s_l = cos(Head(z_l), e_text)`` — ``Head`` is the tower's own final norm, pooling and projection
  (``tower.head``), so the score of the last block is the model's similarity [LG-score: the intermediate
  tokens are mapped to the joint space by the model's own head];
* ``∇A_l = ∂s_l / ∂A_l`` with ``A_l`` ``[B, heads, T, T]`` the attention probabilities of block ``l``
  (explicit-attention path ``attn_hook``); ``s_l`` depends on ``A_l`` through block ``l`` and the head only;
* ``E_l = mean_heads mean_queries ReLU(∇A_l)`` ``[B, T]`` [LG-layer: only positive gradients, averaged
  over heads and over every query row];
* ``E = Σ_l E_l`` over the chosen layers [LG-sum], read on the patch columns (class / register tokens
  dropped); the public map is its min-max normalisation (``to_maps``, as the paper's).

The bracketed tags name the paper's steps in the code below (equation numbers were not checked against the
ICCV text: the steps follow the arXiv method description and the maintained package ``WalBouss/LeGrad``).

Default layers: the last two blocks (``layers=2``: the maintained package's ``layer_index=-2``);
``layers="all"`` aggregates every block (the paper's full aggregation). Differences from the maintained
package, named: clipib's ``Head`` is the tower's own (CLS token for OpenAI CLIP towers; the package averages
every token of a CLS tower before ``ln_post``); for MAP-pooled towers (SigLIP, PE-Core) the package
differentiates the MAP head's attention instead of the blocks' and subtracts an "empty prompt" map
(it needs a tokenizer); clipib explains the blocks' self-attention on every tower. Text: not attributed
(the paper explains images).
"""

from __future__ import annotations

from typing import List, Union

import torch
from torch import Tensor

from clipib.attribution.base import Attributor, Scores
from clipib.attribution.common import cosine
from clipib.models.split import SplitCLIP, Tower


class LeGrad(Attributor):
    """LeGrad: positive gradients of each layer's similarity w.r.t. its attention map, summed over layers.

    Args:
        clip: the model.
        layers: how many of the last blocks to aggregate (default 2, the maintained package's), or ``"all"``.
        seed: unused (deterministic); kept for the common constructor.
    """

    name = "legrad"
    modalities = ("image",)

    def __init__(self, clip: SplitCLIP, layers: Union[int, str] = 2, seed: int = 0) -> None:
        super().__init__(clip, seed=seed)
        if layers != "all" and (not isinstance(layers, int) or layers < 1):
            raise ValueError(f"layers must be a positive int or 'all', got {layers!r}")
        self.layers = layers

    def first_layer(self, tower: Tower) -> int:
        """Index of the first aggregated block."""
        return 0 if self.layers == "all" else max(0, tower.n_layers - int(self.layers))

    def layer_maps(self, tower: Tower, x: Tensor, target: Tensor) -> Tensor:
        """``E_l`` ``[n_chosen, B, T]`` [LG-layer] for each chosen block, in block order."""
        first = self.first_layer(tower)
        with torch.no_grad():
            h = tower.prefix(x, first)  # [B, T, D]
        maps: List[Tensor] = []
        for layer in range(first, tower.n_layers):
            z_in = h.detach().requires_grad_(True)  # puts A_l in the graph (the weights are frozen)
            kept: List[Tensor] = []

            def keep(index: int, attn: Tensor) -> Tensor:
                kept.append(attn)
                return attn

            z = tower.run(z_in, layer, layer + 1, attn_hook=keep)  # [B, T, D]: z_l
            s = cosine(tower.head(z, x), target)  # [B]: s_l [LG-score]
            (grad,) = torch.autograd.grad(s.sum(), kept[0])  # [B, heads, T, T]: ∂s_l/∂A_l
            maps.append(grad.clamp(min=0).mean(dim=(1, 2)))  # [B, T]: [LG-layer]
            h = z.detach()
        return torch.stack(maps)

    def image_scores(self, images: Tensor, ids: Tensor, target: Tensor, generators: List[torch.Generator]) -> Scores:
        tower = self.clip.image
        return tower.to_grid(self.layer_maps(tower, images, target).sum(0)), {}  # [LG-sum] → [B, gh, gw]
