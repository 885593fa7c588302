"""Grad-ECLIP (Zhao, Wang, Hsiao, Chan; ICML 2024 "Gradient-based Visual Explanation for Transformer-based
CLIP", and its journal extension with text explanations), image and text.

Grad-ECLIP decomposes the pooled output of the last attention into value features and weights them:

* ``S = cos(e_image, e_text)`` the pair's similarity;
* ``O`` = the attention output of the explained block before its output projection, ``O_t = Σ_i A_ti v_i``
  (heads concatenated), ``v_i`` the value features;
* channel weights ``w_c = ∂S/∂O_{t*,c}`` at the pooled query row ``t*`` [GE-channel];
* spatial weights ``λ_i = minmax_i cos(q_{t*}, k_i)`` (query of the pooled row against every key it attends
  to — under a causal mask the keys up to ``t*``, so padding never enters — heads concatenated; the paper's
  "loosened" attention, replacing the softmax) [GE-spatial];
* map ``H_i = ReLU(Σ_c w_c v_{i,c} λ_i)`` [GE-map]; text: the same summed over the last ``text_blocks``
  blocks before the ReLU, at the EOT row [GE-text].

clipib computes ``Σ_c w_c v_{i,c}`` without patching the attention: since ``O_t = A_t V`` head by head,
``∂S/∂A^h_{t,i} = Σ_{c ∈ h} ∂S/∂O_{t,c} · v_{i,c}``, so the channel-weighted value of token ``i`` is the sum over
heads of the gradient with respect to the attention probabilities of row ``t*`` (explicit-attention path).
Queries and keys come from ``Tower.run(..., qk_hook=...)`` (timm RoPE towers: before the rotary embedding).

Pooled row ``t*``: the class token (the paper's CLIP ViTs), the EOT for text. For towers whose head pools
several rows (mean, MAP: SigLIP, PE-Core) clipib averages the per-row map over the rows as the head weights
them (``ImageTower.pool_weights``) — a generalisation, named here. Defaults: image = the last block (the
paper); ``text_blocks``: 8 of 12 (scaled to the tower's depth), the setting of the authors' text code as
public ports reproduce it (not checked against the journal text). Differences from the authors' code: it
recomputes the last attention with a single head (one softmax over the full width); clipib keeps the model's
own multi-head forward. The text map is not divided by its sum (``to_maps`` min-max normalises it).
"""

from __future__ import annotations

import math
from typing import Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from clipib.attribution.base import Attributor, Scores
from clipib.attribution.common import cosine
from clipib.models.split import SplitCLIP, Tower


def minmax_rows(x: Tensor, valid: Tensor) -> Tensor:
    """Min-max each row of ``x`` ``[..., N]`` to [0, 1] over its ``valid`` entries (0 elsewhere; a constant row
    maps to 0)."""
    lo = x.masked_fill(~valid, math.inf).amin(-1, keepdim=True)
    hi = x.masked_fill(~valid, -math.inf).amax(-1, keepdim=True)
    return ((x - lo) / (hi - lo).clamp_min(torch.finfo(x.dtype).tiny)).masked_fill(~valid, 0)


class GradECLIP(Attributor):
    """Grad-ECLIP: value features weighted by the similarity's gradient (channels) and query-key cosine (space).

    Args:
        clip: the model.
        text_blocks: how many of the text tower's last blocks to sum; None = 8 of 12 scaled to the tower's depth
            (``round(8·n/12)``, at least 1).
        spatial: use the spatial weights ``λ`` (the paper; False = channel weights only, for comparison).
        seed: unused (deterministic); kept for the common constructor.
    """

    name = "grad_eclip"

    def __init__(self, clip: SplitCLIP, text_blocks: Optional[int] = None, spatial: bool = True,
                 seed: int = 0) -> None:
        super().__init__(clip, seed=seed)
        if text_blocks is not None and text_blocks < 1:
            raise ValueError(f"text_blocks must be >= 1, got {text_blocks}")
        self.text_blocks, self.spatial = text_blocks, spatial

    def block_maps(self, tower: Tower, x: Tensor, target: Tensor, first: int) -> Tuple[List[Tensor], List[Tensor]]:
        """Per explained block ``b >= first``: ``Σ_heads ∂S/∂A_b`` ``[B, T, T]`` (row t: ``Σ_c ∂S/∂O_{t,c} v_{·,c}``)
        and ``λ_b`` ``[B, T, T]`` (row t: min-max over keys of ``cos(q_t, k_·)``)."""
        with torch.no_grad():
            h = tower.prefix(x, first)  # [B, T, D]
        h.requires_grad_(True)  # puts the attention probabilities in the graph (the weights are frozen)
        attns: Dict[int, Tensor] = {}
        qks: Dict[int, Tuple[Tensor, Tensor]] = {}

        def keep(index: int, attn: Tensor) -> Tensor:
            attns[index] = attn
            return attn

        def keep_qk(index: int, q: Tensor, k: Tensor) -> None:
            qks[index] = (q.detach(), k.detach())

        z = tower.run(h, first, tower.n_layers, attn_hook=keep, qk_hook=keep_qk, x=x)  # [B, T, D]
        score = cosine(tower.head(z, x), target)  # [B]: S
        order = sorted(attns)
        grads = torch.autograd.grad(score.sum(), [attns[i] for i in order])  # [B, heads, T, T] each
        weighted = [g.sum(1) for g in grads]  # [B, T, T]: Σ_c w_c v_{i,c} per query row [GE-channel]
        spatial = []
        for i in order:
            q, k = qks[i]  # [B, heads, T, d]
            qf, kf = (F.normalize(u.transpose(1, 2).flatten(2), dim=-1) for u in (q, k))  # [B, T, D]
            sim = qf @ kf.transpose(-1, -2)  # [B, T, T]: cos(q_t, k_i)
            visible = attns[i].detach().sum(1) > 0  # [B, T, T]: the keys each query attends to (causal mask)
            spatial.append(minmax_rows(sim, visible) if self.spatial else torch.ones_like(sim))  # [GE-spatial]
        return weighted, spatial

    def image_scores(self, images: Tensor, ids: Tensor, target: Tensor, generators: List[torch.Generator]) -> Scores:
        tower = self.clip.image
        weighted, spatial = self.block_maps(tower, images, target, tower.n_layers - 1)
        with torch.no_grad():
            rows = tower.pool_weights(images)  # [B, T]: one-hot CLS, or the head's weights over rows
        per_row = weighted[0] * spatial[0]  # [B, T, T]
        scores = torch.relu((rows[:, None] @ per_row)[:, 0])  # [B, T]: [GE-map]
        return tower.to_grid(scores), {}

    def text_scores(self, images: Tensor, ids: Tensor, target: Tensor, generators: List[torch.Generator]) -> Scores:
        tower = self.clip.text
        n = tower.n_layers
        blocks = max(1, math.floor(8 * n / 12 + 0.5)) if self.text_blocks is None else self.text_blocks
        first = n - min(n, blocks)
        weighted, spatial = self.block_maps(tower, ids, target, first)
        eot = tower.eot_positions(ids)  # [B]
        rows = torch.arange(ids.shape[0], device=ids.device)
        total = sum(w[rows, eot] * s[rows, eot] for w, s in zip(weighted, spatial))  # [B, L]: Σ over blocks
        return torch.relu(total), {}  # [GE-text]
