"""KernelSHAP (Lundberg & Lee, NeurIPS 2017) over image patches and text tokens, via Captum's ``KernelShap``.

Players: the patches of the model's own grid (``clip.grid``) for images; the content tokens strictly
between SOT and EOT for text (SOT and EOT are always present and score 0). Value function:
``v(S) = cos(f(x_S), e_other)`` where ``x_S`` keeps the players in ``S`` and replaces the others —
patches by each image's per-channel mean (``image_baseline="mean"``, default; ``"black"`` / ``"zero"``
are options), tokens by the pad token (id 0). Captum samples coalitions with the Shapley kernel and pins
the empty and full coalitions (weight 1e6), so the attributions satisfy efficiency,
``Σ_i φ_i ≈ v(all) − v(∅)``.

Differences from Captum's defaults, both deliberate:

* ``n_samples`` defaults to ``2·M + 2048`` (M players), the ``"auto"`` rule of the SHAP authors' ``shap``
  package; Captum's default of 25 is fewer samples than there are patches of ViT-B/32 (49), for which
  the regression is under-determined.
* The surrogate is fitted by exact weighted least squares (``torch.linalg.lstsq``, float64) instead of
  Captum's default scikit-learn ``LinearRegression``: the same estimator, without a scikit-learn
  dependency. It plugs into Captum as its own ``LinearModel`` with a custom training function.

Random streams: Captum samples coalitions from torch's global RNG, so each pair runs alone under a forked
RNG seeded from that pair's generator; a pair's result does not depend on its batch-mates.
"""

from __future__ import annotations

from typing import Any, Callable, Dict, List, Optional

import torch
from captum._utils.models.linear_model import LinearModel
from captum.attr import KernelShap as CaptumKernelShap
from torch import Tensor
from torch.utils.data import DataLoader

from clipib.attribution.base import Attributor, Scores
from clipib.attribution.common import (
    FILLS,
    PAD_ID,
    Fill,
    cosine,
    pair_rng,
    patch_feature_mask,
    reference_image,
)
from clipib.models.split import SplitCLIP


def fit_weighted_least_squares(
    model: LinearModel, dataloader: DataLoader, construct_kwargs: Dict[str, Any], **_: Any
) -> Dict[str, float]:
    """Captum ``LinearModel`` training function: exact weighted least squares with an intercept.

    Reads ``(x [n, M], y [n] or [n, k], w [n])`` batches and sets the model's weights ``[k, M]`` and bias.
    """
    xs, ys, ws = zip(*dataloader)
    x = torch.cat(xs).double().cpu()  # [n, M]
    y = torch.cat(ys).double().cpu().reshape(x.shape[0], -1)  # [n, k]
    sqrt_w = torch.cat(ws).double().cpu().clamp_min(0).sqrt()[:, None]  # [n, 1]
    design = torch.cat([torch.ones_like(x[:, :1]), x], dim=1)  # [n, 1 + M]
    sol = torch.linalg.lstsq(design * sqrt_w, y * sqrt_w, driver="gelsd").solution  # [1 + M, k]
    model._construct_model_params(norm_type=None, weight_values=sol[1:].T.float(), bias_value=sol[0].float())
    return {}


class KernelShap(Attributor):
    """KernelSHAP values of patches (``[B, gh, gw]``) and content tokens (``[B, L]``) for the cross-modal cosine.

    Args:
        clip: the model.
        n_samples: coalitions evaluated per pair and modality; None = ``2·M + 2048`` (``shap``'s "auto").
        image_baseline: what removed patches become: ``"mean"`` (default, the image's channel mean),
            ``"black"`` or ``"zero"`` (0 after normalisation).
        pad_id: the token removed tokens become (default 0, open_clip's pad id).
        internal_batch_size: coalitions per forward pass (Captum's ``perturbations_per_eval``).
        seed: coalition-sampling seed of every pair when ``attribute`` gets no ``seeds``.
    """

    name = "kernel_shap"

    def __init__(
        self,
        clip: SplitCLIP,
        n_samples: Optional[int] = None,
        image_baseline: Fill = "mean",
        pad_id: int = PAD_ID,
        internal_batch_size: int = 64,
        seed: int = 0,
    ) -> None:
        super().__init__(clip, seed=seed)
        if image_baseline not in FILLS:
            raise ValueError(f"image_baseline must be one of {FILLS}, got {image_baseline!r}")
        if n_samples is not None and n_samples < 2:
            raise ValueError("n_samples must be >= 2 (the full and the empty coalition)")
        if internal_batch_size < 1:
            raise ValueError("internal_batch_size must be >= 1")
        self.n_samples, self.image_baseline, self.pad_id = n_samples, image_baseline, pad_id
        self.internal_batch_size = internal_batch_size

    def samples_for(self, n_players: int) -> int:
        """Coalitions evaluated for ``n_players`` players."""
        return self.n_samples if self.n_samples is not None else 2 * n_players + 2048

    def _shapley(self, forward: Callable, x: Tensor, baseline: Tensor, extra: tuple, mask: Tensor, m: int) -> Tensor:
        """Coefficients ``[M]`` for one pair ``x`` ``[1, ...]`` with ``m`` players (``mask`` indexes them)."""
        if m == 1:  # one player: its Shapley value is the whole gap (Captum's sampler needs M >= 2)
            with torch.no_grad():
                return (forward(x, *extra) - forward(baseline, *extra)).reshape(1)
        explainer = CaptumKernelShap(forward)
        explainer.interpretable_model = LinearModel(train_fn=fit_weighted_least_squares)
        coefs = explainer.attribute(
            x,
            baselines=baseline,
            additional_forward_args=extra,
            feature_mask=mask,
            n_samples=self.samples_for(m),
            perturbations_per_eval=self.internal_batch_size,
            return_input_shape=False,
        )
        return coefs.reshape(m).to(x.device)  # the surrogate is fitted on the CPU

    def _image_value(self, images: Tensor, target: Tensor) -> Tensor:
        return cosine(self.clip.image.encode(images), target)  # [N]

    def image_scores(self, images: Tensor, ids: Tensor, target: Tensor, generators: List[torch.Generator]) -> Scores:
        grid = self.clip.grid
        mask = patch_feature_mask(self.clip, images.device)  # [1, 1, H, W]
        reference = reference_image(self.clip, images, self.image_baseline)  # [B, 3, H, W]
        out = []
        for i, gen in enumerate(generators):
            with pair_rng(gen), torch.no_grad():
                phi = self._shapley(
                    self._image_value, images[i : i + 1], reference[i : i + 1].contiguous(),
                    (target[i : i + 1],), mask, grid[0] * grid[1],
                )
            out.append(phi.reshape(grid))
        return torch.stack(out), {}  # [B, gh, gw]

    def _text_value(self, content: Tensor, ids: Tensor, positions: tuple, target: Tensor) -> Tensor:
        """Score of ``ids`` ``[1, L]`` (Captum may repeat it along the batch) with its content tokens (at the
        ``M`` ``positions``, a tuple: Captum would repeat a tensor) replaced by ``content`` ``[N, M]``."""
        full = ids[:1].expand(content.shape[0], -1).clone()  # [N, L]
        full[:, list(positions)] = content
        pool_at = self.clip.text.eot_positions(full)  # [N]
        emb = self.clip.text.encode_embeddings(self.clip.text.token_embeddings(full), pool_at, full)  # [N, E]
        return cosine(emb, target)

    def text_scores(self, images: Tensor, ids: Tensor, target: Tensor, generators: List[torch.Generator]) -> Scores:
        text = self.clip.text
        out = torch.zeros(ids.shape[0], text.valid_length(ids), device=ids.device)  # [B, L]
        for i, gen in enumerate(generators):
            row = ids[i : i + 1, : text.valid_length(ids[i : i + 1])]  # [1, L]: SOT..EOT, or the context
            positions = text.span_mask(row, special=False)[0].nonzero()[:, 0]  # [M] content tokens
            m = positions.numel()
            if m < 1:
                continue
            content = row[:, positions]  # [1, M]
            mask = torch.arange(m, device=ids.device)[None]  # [1, M]: one player per token
            with pair_rng(gen), torch.no_grad():
                phi = self._shapley(self._text_value, content, torch.full_like(content, self.pad_id),
                                    (row, tuple(positions.tolist()), target[i : i + 1]), mask, m)
            out[i, positions] = phi
        return out, {}
