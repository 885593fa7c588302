"""Integrated Gradients (Sundararajan, Taly, Yan, ICML 2017) on pixels and token embeddings, via Captum.

``IG_i(x) = (x_i − x'_i) ∫_0^1 ∂F(x' + α(x − x'))/∂x_i dα`` with ``F = cos(f(x), e_other)``, the cosine of the
explained tower's embedding with the other modality's clean embedding. Completeness:
``Σ_i IG_i = F(x) − F(x')`` up to the quadrature error, which Captum reports as the convergence delta
(recorded per pair in ``Attribution.scalars["image_delta"]`` / ``["text_delta"]``).

Defaults: 50 steps with Captum's default Gauss-Legendre quadrature (``method="gausslegendre"``; the paper
uses a Riemann sum with 20-300 steps, available as ``method="riemann_right"`` etc.).

Image: baseline a black image (the paper's choice for images), i.e. pixel value 0 in [0, 1] pixel space,
which is ``−mean/std`` per channel after CLIP's normalisation; attributions are summed over the colour
channels, sign kept, at input resolution ``[B, H, W]``.

Text: the path runs over the token-embedding rows (before positional embeddings; the EOT pooling position
is held fixed). Baseline (``text_baseline="pad"``, default): every content token between SOT and EOT
replaced by the embedding of the pad token (id 0), SOT and EOT kept — the common reference for
transformers (e.g. Captum's BERT tutorial), so SOT and EOT get 0 attribution. ``text_baseline="zero"``
uses the all-zero embedding at every position instead. Per token, attributions are summed over the
embedding dimensions, sign kept (so per-token scores still add up to ``F(x) − F(x')``).
"""

from __future__ import annotations

from typing import List, Literal, Optional

import torch
from captum.attr import IntegratedGradients as CaptumIG
from torch import Tensor

from clipib.attribution.base import Attributor, Scores
from clipib.attribution.common import FILLS, PAD_ID, Fill, cosine, reference_image
from clipib.models.split import SplitCLIP


class IntegratedGradients(Attributor):
    """Integrated gradients of the cross-modal cosine, pixels (black baseline) and token embeddings (pad baseline).

    Args:
        clip: the model.
        steps: quadrature points (Captum's default 50).
        method: Captum's quadrature rule: ``"gausslegendre"`` (default), ``"riemann_right"``,
            ``"riemann_left"``, ``"riemann_middle"`` or ``"riemann_trapezoid"``.
        internal_batch_size: most rows (pairs × steps) per forward/backward pass, at least one step of every
            pair (Captum's chunking by steps); None = all at once. Default 64: a batch of 32 ViT-B/32 pairs
            at 50 steps in one graph needs tens of GB (it was OOM-killed at 24 GiB); chunking only changes
            float rounding (tested).
        image_baseline: ``"black"`` (default, the paper's), ``"mean"`` (each image's channel mean) or
            ``"zero"`` (0 after normalisation = the dataset-mean colour).
        text_baseline: ``"pad"`` (default; content tokens → pad embedding, SOT/EOT kept) or ``"zero"``.
        seed: unused (deterministic method).
    """

    name = "integrated_gradients"

    def __init__(
        self,
        clip: SplitCLIP,
        steps: int = 50,
        method: str = "gausslegendre",
        internal_batch_size: Optional[int] = 64,
        image_baseline: Fill = "black",
        text_baseline: Literal["pad", "zero"] = "pad",
        seed: int = 0,
    ) -> None:
        super().__init__(clip, seed=seed)
        if steps < 1:
            raise ValueError("steps must be >= 1")
        if internal_batch_size is not None and internal_batch_size < 1:
            raise ValueError("internal_batch_size must be >= 1 or None")
        if image_baseline not in FILLS:
            raise ValueError(f"image_baseline must be one of {FILLS}, got {image_baseline!r}")
        if text_baseline not in ("pad", "zero"):
            raise ValueError(f"text_baseline must be 'pad' or 'zero', got {text_baseline!r}")
        self.steps, self.method = steps, method
        self.internal_batch_size = internal_batch_size
        self.image_baseline, self.text_baseline = image_baseline, text_baseline

    def _image_score(self, images: Tensor, target: Tensor) -> Tensor:
        return cosine(self.clip.image.encode(images), target)  # [N]

    def _text_score(self, tok_emb: Tensor, target: Tensor, pool_at: Tensor, ids: Tensor) -> Tensor:
        return cosine(self.clip.text.encode_embeddings(tok_emb, pool_at, ids), target)  # [N]

    def text_reference(self, ids: Tensor) -> Tensor:
        """The text baseline ``[B, L, D]`` for ``ids`` ``[B, L]``."""
        tok_emb = self.clip.text.token_embeddings(ids)  # [B, L, D]
        if self.text_baseline == "zero":
            return torch.zeros_like(tok_emb)
        pad = self.clip.text.token_embeddings(torch.full_like(ids[:1, :1], PAD_ID))  # [1, 1, D]
        return torch.where(self.clip.text.span_mask(ids, special=False)[..., None], pad, tok_emb)

    def _run(self, forward, inputs: Tensor, baseline: Tensor, extra: tuple, modality: str) -> Scores:
        chunk = self.internal_batch_size
        if chunk is not None:
            chunk = max(chunk, inputs.shape[0])  # Captum's smallest chunk: one step of every pair
        attr, delta = CaptumIG(forward).attribute(
            inputs,
            baselines=baseline,
            additional_forward_args=extra,
            n_steps=self.steps,
            method=self.method,
            internal_batch_size=chunk,
            return_convergence_delta=True,
        )
        return attr, {f"{modality}_delta": delta.detach().float()}

    def image_scores(self, images: Tensor, ids: Tensor, target: Tensor, generators: List[torch.Generator]) -> Scores:
        baseline = reference_image(self.clip, images, self.image_baseline).contiguous()  # [B, 3, H, W]
        attr, scalars = self._run(self._image_score, images, baseline, (target,), "image")  # [B, 3, H, W]
        return attr.sum(dim=1), scalars  # [B, H, W]

    def text_scores(self, images: Tensor, ids: Tensor, target: Tensor, generators: List[torch.Generator]) -> Scores:
        text = self.clip.text
        ids = ids[:, : text.valid_length(ids)]  # [B, L]
        pool_at = text.eot_positions(ids)  # [B]
        tok_emb = text.token_embeddings(ids)  # [B, L, D]
        attr, scalars = self._run(self._text_score, tok_emb, self.text_reference(ids), (target, pool_at, ids), "text")
        return attr.sum(dim=-1), scalars  # [B, L]
