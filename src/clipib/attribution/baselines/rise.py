"""RISE: Randomized Input Sampling for Explanation (Petsiuk, Das, Saenko, BMVC 2018); Captum has no RISE.

Saliency ``S = Σ_i score(x ⊙ M_i) · M_i / (N · E[M])`` with ``score = cos(f(·), e_other)``, the cosine with
the other modality's clean embedding, over N random masks M_i.

Image masks (paper Sec. 3.2): a binary ``s × s`` grid, each cell kept with probability p, bilinearly
upsampled to ``(s + 1)·C`` with ``C = ⌈H/s⌉`` (per axis), then an ``H × W`` window cropped at a random
offset in ``[0, C)`` per axis. ``x ⊙ M`` dims pixels towards zero intensity, as the paper describes it
("reducing their intensities down to zero"): the mask acts in [0, 1] pixel space, i.e. on the normalised
input ``x ⊙ M + (1 − M) · black`` (``fill="black"``, default; ``"zero"`` multiplies the normalised
input directly, dimming towards the dataset-mean colour; ``"mean"`` towards the image's channel mean).
Defaults N = 4000, s = 7, p = 0.5: the paper's ResNet-50 setting (it uses 8000 masks for VGG16).
NIB's reference code uses 6000 masks, grid 8, p = 0.1 (REFERENCE_NOTES §5); pass those to compare.

Text masks (not in the paper, which explains images): each content token between SOT and EOT kept with
probability p, removed tokens replaced by the pad token (id 0); SOT and EOT are always kept. N = 200, as
NIB's reference code uses for text. Normalising by each position's own ``E[M_t]`` (p for content tokens,
1 for SOT/EOT) gives SOT/EOT the mean score, the level a token without effect gets.

Masks come from the pair's generator (drawn once, up front, so the result does not depend on the chunking)
and are evaluated ``internal_batch_size`` at a time. Raw scores are in the score's units (≈ E[score | kept]).
"""

from __future__ import annotations

import math
from typing import List, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from clipib.attribution.base import Attributor, Scores
from clipib.attribution.common import FILLS, PAD_ID, Fill, cosine, reference_image
from clipib.models.split import SplitCLIP


class RISE(Attributor):
    """Randomised masking; image map ``[B, H, W]`` at input resolution, text map one score per token.

    Args:
        clip: the model.
        n_masks: image masks per pair N (paper: 4000 for ResNet-50, 8000 for VGG16; NIB's code 6000).
        grid_size: coarse mask grid s (paper 7; NIB's code 8).
        p: probability of keeping a grid cell / token (paper 0.5; NIB's code 0.1 for images).
        text_masks: token masks per pair (NIB's code: 200).
        fill: what masked pixels fade to: ``"black"`` (default, the paper's), ``"zero"``, ``"mean"``.
        pad_id: the token masked tokens become (default 0, open_clip's pad id).
        internal_batch_size: masked inputs per forward pass.
        seed: mask seed of every pair when ``attribute`` gets no ``seeds``.
    """

    name = "rise"

    def __init__(
        self,
        clip: SplitCLIP,
        n_masks: int = 4000,
        grid_size: int = 7,
        p: float = 0.5,
        text_masks: int = 200,
        fill: Fill = "black",
        pad_id: int = PAD_ID,
        internal_batch_size: int = 100,
        seed: int = 0,
    ) -> None:
        super().__init__(clip, seed=seed)
        if not 0.0 < p <= 1.0:
            raise ValueError(f"p must be in (0, 1], got {p}")
        if min(n_masks, text_masks, grid_size, internal_batch_size) < 1:
            raise ValueError("n_masks, text_masks, grid_size and internal_batch_size must be >= 1")
        if fill not in FILLS:
            raise ValueError(f"fill must be one of {FILLS}, got {fill!r}")
        self.n_masks, self.grid_size, self.p, self.text_masks = n_masks, grid_size, p, text_masks
        self.fill, self.pad_id, self.internal_batch_size = fill, pad_id, internal_batch_size

    # --- image -----------------------------------------------------------------------------------------
    def draw_image_masks(self, generator: torch.Generator) -> Tuple[Tensor, Tensor]:
        """``(grids [N, s, s] float, offsets [N, 2] long)`` on the CPU, from ``generator``."""
        s, (h, w) = self.grid_size, self.clip.image_size
        grids = (torch.rand(self.n_masks, s, s, generator=generator) < self.p).float()
        cell = torch.tensor([math.ceil(h / s), math.ceil(w / s)])
        offsets = (torch.rand(self.n_masks, 2, generator=generator) * cell).long().minimum(cell - 1)
        return grids, offsets

    def upsample(self, grids: Tensor, offsets: Tensor) -> Tensor:
        """Smooth masks ``[n, H, W]``: bilinear upsampling of ``grids`` ``[n, s, s]`` to ``(s+1)·C``, shifted crop."""
        s, (h, w) = self.grid_size, self.clip.image_size
        ch, cw = math.ceil(h / s), math.ceil(w / s)
        up = F.interpolate(grids[:, None], size=((s + 1) * ch, (s + 1) * cw), mode="bilinear", align_corners=False)
        rows = offsets[:, :1] + torch.arange(h, device=grids.device)  # [n, H]
        cols = offsets[:, 1:] + torch.arange(w, device=grids.device)  # [n, W]
        n = torch.arange(grids.shape[0], device=grids.device)
        return up[n[:, None, None], 0, rows[:, :, None], cols[:, None, :]]  # [n, H, W]

    def _image_one(self, image: Tensor, reference: Tensor, target: Tensor, gen: torch.Generator) -> Tensor:
        """RISE map ``[H, W]`` of one image ``[3, H, W]``."""
        grids, offsets = (t.to(image.device) for t in self.draw_image_masks(gen))
        grids = grids.to(image.dtype)
        total = torch.zeros(image.shape[-2:], dtype=image.dtype, device=image.device)  # [H, W]
        for start in range(0, self.n_masks, self.internal_batch_size):
            sl = slice(start, start + self.internal_batch_size)
            masks = self.upsample(grids[sl], offsets[sl])[:, None]  # [n, 1, H, W]
            masked = image * masks + reference * (1 - masks)  # [n, 3, H, W]
            scores = cosine(self.clip.image.encode(masked), target)  # [n]
            total += torch.einsum("n,nhw->hw", scores, masks[:, 0])
        return total / (self.n_masks * self.p)

    def image_scores(self, images: Tensor, ids: Tensor, target: Tensor, generators: List[torch.Generator]) -> Scores:
        reference = reference_image(self.clip, images, self.fill)  # [B, 3, H, W]
        with torch.no_grad():
            maps = [self._image_one(images[i], reference[i], target[i : i + 1], g) for i, g in enumerate(generators)]
        return torch.stack(maps), {}  # [B, H, W]

    # --- text ------------------------------------------------------------------------------------------
    def draw_token_masks(self, n_content: int, generator: torch.Generator) -> Tensor:
        """Keep-masks ``[N, eot+1]`` bool over SOT, ``n_content`` content tokens and EOT (SOT/EOT always kept)."""
        keep = torch.rand(self.text_masks, n_content, generator=generator) < self.p
        ends = torch.ones(self.text_masks, 1, dtype=torch.bool)
        return torch.cat([ends, keep, ends], dim=1)

    def _text_one(self, row: Tensor, target: Tensor, gen: torch.Generator) -> Tensor:
        """RISE scores ``[L]`` of one row of ids ``[L]`` (SOT..EOT, or the whole context for a bidirectional
        tower): the content tokens (``span_mask(special=False)``) are masked, every other position kept."""
        text = self.clip.text
        content = text.span_mask(row[None], special=False)[0].nonzero()[:, 0]  # [M]
        drawn = self.draw_token_masks(content.numel(), gen).to(row.device)[:, 1:-1]  # [N, M]
        masks = torch.ones(self.text_masks, row.shape[0], dtype=torch.bool, device=row.device)  # [N, L]
        masks[:, content] = drawn
        pool_at = text.eot_positions(row[None])  # [1]
        total = torch.zeros(row.shape[0], device=row.device)
        for start in range(0, self.text_masks, self.internal_batch_size):
            keep = masks[start : start + self.internal_batch_size]  # [n, eot+1]
            ids = torch.where(keep, row, torch.full_like(row, self.pad_id))  # [n, eot+1]
            emb = text.encode_embeddings(text.token_embeddings(ids), pool_at.expand(ids.shape[0]), ids)  # [n, E]
            total += cosine(emb, target).float() @ keep.float()
        expected = torch.ones_like(total)
        expected[content] = self.p  # SOT, EOT (and padding) always kept
        return total / (self.text_masks * expected)

    def text_scores(self, images: Tensor, ids: Tensor, target: Tensor, generators: List[torch.Generator]) -> Scores:
        text = self.clip.text
        out = torch.zeros(ids.shape[0], text.valid_length(ids), device=ids.device)  # [B, L]
        with torch.no_grad():
            for i, gen in enumerate(generators):
                if not text.span_mask(ids[i : i + 1], special=False).any():  # no content token: nothing to mask
                    continue
                length = text.valid_length(ids[i : i + 1])
                out[i, :length] = self._text_one(ids[i, :length], target[i : i + 1], gen)
        return out, {}
