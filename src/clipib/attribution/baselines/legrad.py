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
  dropped); the public map is its min-max normalisation (``to_maps``, as the package's).

The bracketed tags are clipib's names for the steps; they are not the paper's equation numbers.

What was checked, and against what (offline, 2026-12-02). The paper's method section (arXiv 2404.03214 v1/v2,
ICCV 2025 pp. 20336-20345) could not be read here: only its abstract (arXiv v1/v2 pages, the ICCV open-access
page) was available, so **no equation number is cited and none was verified**. The abstract confirms: the
explanation signal is the gradient with respect to the attention maps of single ViT layers; the signal is
aggregated over all layers, combining the activations of the last and of intermediate tokens. Every other step
was checked against the authors' package ``WalBouss/LeGrad`` (``legrad/wrapper.py`` at 8c2ca90,
``legrad/utils.py`` at c5c7b20), not against the paper: ``A_l`` is the post-softmax attention of block ``l``;
``s_l`` is the similarity of the text embedding with the L2-normalised embedding read from block ``l``'s output;
the gradient is clamped at 0 (ReLU), averaged over heads and then over every query row, the class column is
dropped, the layer maps are summed (not averaged) and min-max normalised per map.

Default layers: the last two blocks (``layers=2``: the package's ``LeWrapper(layer_index=-2)``);
``layers="all"`` aggregates every block (the abstract's "over all layers"). Differences from the package, named:

* CLS towers (OpenAI-style ViTs): the package reads block ``l``'s output as ``ln_post(mean of every token,
  class token included) @ proj``; clipib applies the tower's own head (``tower.head``: the class token).
* MAP-pooled towers (SigLIP / SigLIP 2 timm trunks; CoCa's attentional pooler): the package does not use the
  blocks' self-attention there. It passes each chosen block's tokens through the MAP head (without the tower's
  final norm) and differentiates the similarity with respect to *the MAP head's* attention probabilities (its one
  query; CoCa: the first query), ReLU, mean over heads. For timm SigLIP it then builds the same map for the fixed
  prompt "a photo of a" and zeroes the main map wherever that map, min-max normalised, exceeds 0.8
  (``apply_correction``, ``correction_threshold=0.8``) — a tokenizer-dependent correction. clipib explains the
  blocks' self-attention on every tower, with the tower's own head (MAP pooling included) as ``Head``, and applies
  no correction; a researcher reproducing the package's SigLIP maps should expect them to differ.
* Text: not attributed (the paper explains images).
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
