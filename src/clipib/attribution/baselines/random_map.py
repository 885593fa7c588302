"""A random attribution baseline: uniform scores on the patch grid and per token.

Each pair draws from its own generator (``generators[i]``), image first then text when both are asked for
(the order :meth:`~clipib.attribution.base.Attributor.attribute` calls them in), so a pair's maps depend on
its seed alone: not on the model's weights, the inputs, or the other pairs in the batch. The text draw has
one value per context position (``ids.shape[1]``), so it does not depend on the batch's longest caption.
"""

from __future__ import annotations

from typing import List

import torch
from torch import Tensor

from clipib.attribution.base import Attributor, Scores


class RandomMap(Attributor):
    """Uniform U[0, 1) scores: ``[gh, gw]`` per image, ``[ctx]`` per caption, drawn from the pair's generator.

    Args:
        clip: the model (only its grid is read).
        seed: the seed of every pair when ``attribute`` gets no ``seeds``.
    """

    name = "random"

    def image_scores(self, images: Tensor, ids: Tensor, target: Tensor, generators: List[torch.Generator]) -> Scores:
        grid = self.clip.grid
        maps = [torch.rand(grid, generator=g, dtype=torch.float32) for g in generators]
        return torch.stack(maps).to(images.device), {}  # [B, gh, gw]

    def text_scores(self, images: Tensor, ids: Tensor, target: Tensor, generators: List[torch.Generator]) -> Scores:
        ctx = ids.shape[1]
        rows = [torch.rand(ctx, generator=g, dtype=torch.float32) for g in generators]
        return torch.stack(rows).to(ids.device), {}  # [B, ctx]
