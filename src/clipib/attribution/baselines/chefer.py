"""Chefer, Gur, Wolf (ICCV 2021), "Generic Attention-model Explainability", applied to CLIP.

Target: the image-text logit ``scale · cos`` (scale 100, CLIP's logit scale; REFERENCE_NOTES §4). For each
accumulated block ``b`` with attention probabilities ``A_b`` ``[B, heads, T, T]``:
``cam_b = mean_heads(clamp(∂target/∂A_b ⊙ A_b, min=0))`` and ``R ← R + cam_b · R`` from ``R = I`` (eq. 6-7 of
the paper, self-attention only). The gradient is the total derivative through the whole suffix: the
probabilities come from the foundation's explicit-attention path (``tower.suffix(..., attn_hook=...)``),
which keeps them in the autograd graph without patching open_clip's modules.

``blocks="last"`` (default) accumulates only the last block of each tower, as the authors' maintained CLIP
notebook does; ``blocks="all"`` is the paper's recursion over every block.

Read-out: image = the CLS row of ``R``, patch columns → grid; for a tower whose head pools several rows the
rows of ``R − I`` weighted as the head weights them (``ImageTower.pool_weights``: the mean of the patch rows
for ``avg``; timm's ``map`` head's attention probabilities, averaged over heads, for SigLIP / PE-Core) — a
clipib generalisation: the method is defined for the pooled token's row. For a CLS tower this is the CLS row. Text = the EOT row of ``R − I``
(the identity's self-term removed) over 0..EOT; with ``text_ends="drop"`` (default, as the reference reads
columns 1..EOT−1 only) SOT and EOT score 0, the lowest relevance there is; ``text_ends="keep"`` keeps
their values (SOT, an attention sink in CLIP, then often dominates the map). Positions after EOT are 0.
All scores are non-negative.
"""

from __future__ import annotations

from typing import Dict, List, Literal

import torch
from torch import Tensor

from clipib.attribution.base import Attributor, Scores
from clipib.models.split import SplitCLIP, Tower


def accumulate(attns: List[Tensor], grads: List[Tensor], clamp: bool = True) -> Tensor:
    """``R = Π_b (I + cam_b)`` (first block rightmost), ``cam_b = mean_heads((∂/∂A_b ⊙ A_b)⁺)``; ``[B, T, T]``.

    ``attns`` and ``grads`` are ``[B, heads, T, T]`` per block, in block order.
    """
    b, _, t, _ = attns[0].shape
    rel = torch.eye(t, dtype=attns[0].dtype, device=attns[0].device).expand(b, t, t).clone()  # [B, T, T]
    for attn, grad in zip(attns, grads):
        cam = grad * attn
        cam = (cam.clamp(min=0) if clamp else cam).mean(1)  # [B, T, T]
        rel = rel + cam @ rel
    return rel


class Chefer(Attributor):
    """Gradient-weighted attention relevance (Chefer et al. 2021) of the image-text logit.

    Args:
        clip: the model.
        blocks: ``"last"`` (maintained CLIP default: the last block of each tower) or ``"all"`` (the paper).
        text_ends: ``"drop"`` (SOT and EOT score 0, as the reference) or ``"keep"``.
        scale: the logit scale multiplying the cosine (100, CLIP's).
        clamp: keep the positive part of ``∂target/∂A ⊙ A`` (the paper); False is an option for comparison.
        seed: unused (deterministic); kept for the common constructor.
    """

    name = "chefer"

    def __init__(
        self,
        clip: SplitCLIP,
        blocks: Literal["last", "all"] = "last",
        text_ends: Literal["drop", "keep"] = "drop",
        scale: float = 100.0,
        clamp: bool = True,
        seed: int = 0,
    ) -> None:
        super().__init__(clip, seed=seed)
        if blocks not in ("last", "all"):
            raise ValueError(f"blocks must be 'last' or 'all', got {blocks!r}")
        if text_ends not in ("drop", "keep"):
            raise ValueError(f"text_ends must be 'drop' or 'keep', got {text_ends!r}")
        self.blocks, self.text_ends, self.scale, self.clamp = blocks, text_ends, scale, clamp

    def relevance(self, tower: Tower, x: Tensor, target: Tensor) -> Tensor:
        """Relevance matrix ``R`` ``[B, T, T]`` of ``tower`` on inputs ``x`` for the logit with ``target``."""
        first = tower.n_layers - 1 if self.blocks == "last" else 0
        with torch.no_grad():
            h = tower.prefix(x, first)  # [B, T, D]
        h.requires_grad_(True)  # puts the attention probabilities in the graph (the weights are frozen)
        attns: Dict[int, Tensor] = {}

        def keep(index: int, attn: Tensor) -> Tensor:
            attns[index] = attn
            return attn

        logit = self.scale * (tower.suffix(h, first, x, attn_hook=keep) * target).sum(-1)  # [B]
        order = sorted(attns)
        grads = torch.autograd.grad(logit.sum(), [attns[i] for i in order])
        return accumulate([attns[i].detach() for i in order], list(grads), self.clamp)

    def image_scores(self, images: Tensor, ids: Tensor, target: Tensor, generators: List[torch.Generator]) -> Scores:
        tower = self.clip.image
        rel = self.relevance(tower, images, target)  # [B, T, T]
        with torch.no_grad():
            weights = tower.pool_weights(images)  # [B, T]: the rows the head pools (one-hot CLS, mean, MAP)
        n = rel.shape[-1]
        pooled = (weights[:, None] @ (rel - torch.eye(n, dtype=rel.dtype, device=rel.device)))[:, 0]  # [B, T]
        return tower.to_grid(pooled), {}

    def text_scores(self, images: Tensor, ids: Tensor, target: Tensor, generators: List[torch.Generator]) -> Scores:
        rel = self.relevance(self.clip.text, ids, target)  # [B, L, L]
        b, length = rel.shape[:2]
        eot = self.clip.text.eot_positions(ids)  # [B]
        rows = torch.arange(b, device=rel.device)
        scores = rel[rows, eot] - torch.eye(length, dtype=rel.dtype, device=rel.device)[eot]  # [B, L]
        if self.text_ends == "drop":
            scores[:, : self.clip.text.content_start] = 0  # SOT (SigLIP-style towers have none)
            scores[rows, eot] = 0
        return scores, {}
