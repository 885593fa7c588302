"""Saliency: the gradient of the score w.r.t. the input (Simonyan, Vedaldi, Zisserman, ICLR-W 2014), via Captum.

Score: ``cos(f(x), e_other)``, the cosine of the explained tower's embedding with the other modality's clean
embedding. Image: ``max_c |∂score/∂x_{c,h,w}|`` over colour channels at input resolution (the paper's
Sec. 3.1 map for RGB images; gradients w.r.t. the preprocessed, normalised input). Text (not in the paper,
which explains images only): the gradient w.r.t. each token's embedding row (before the positional
embedding), reduced per token by its L2 norm over the embedding dimensions — the usual text analogue,
sign-free like the image map. Deterministic; each pair's gradient depends on that pair alone.
"""

from __future__ import annotations

from typing import List

import torch
from captum.attr import Saliency as CaptumSaliency
from torch import Tensor

from clipib.attribution.base import Attributor, Scores
from clipib.attribution.common import cosine
from clipib.models.split import SplitCLIP


class Saliency(Attributor):
    """Vanilla gradient magnitude; image map at pixel resolution, text map one L2 norm per token.

    Args:
        clip: the model.
        seed: unused (deterministic method); kept for the common constructor.
    """

    name = "saliency"

    def __init__(self, clip: SplitCLIP, seed: int = 0) -> None:
        super().__init__(clip, seed=seed)

    def _image_score(self, images: Tensor, target: Tensor) -> Tensor:
        return cosine(self.clip.image.encode(images), target)  # [B]

    def _text_score(self, tok_emb: Tensor, target: Tensor, pool_at: Tensor, ids: Tensor) -> Tensor:
        return cosine(self.clip.text.encode_embeddings(tok_emb, pool_at, ids), target)  # [B]

    def image_scores(self, images: Tensor, ids: Tensor, target: Tensor, generators: List[torch.Generator]) -> Scores:
        grads = CaptumSaliency(self._image_score).attribute(
            images.detach().requires_grad_(True), additional_forward_args=(target,), abs=True
        )  # [B, 3, H, W]
        return grads.amax(dim=1), {}  # [B, H, W]

    def text_scores(self, images: Tensor, ids: Tensor, target: Tensor, generators: List[torch.Generator]) -> Scores:
        text = self.clip.text
        pool_at = text.eot_positions(ids)  # [B]
        ids = ids[:, : text.valid_length(ids)]  # [B, L]
        tok_emb = text.token_embeddings(ids)  # [B, L, D]
        grads = CaptumSaliency(self._text_score).attribute(
            tok_emb.detach().requires_grad_(True), additional_forward_args=(target, pool_at, ids), abs=True
        )  # [B, L, D]
        return grads.norm(dim=-1), {}  # [B, L]
