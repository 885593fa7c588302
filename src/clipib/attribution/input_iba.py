"""InputIBA: the information bottleneck on the input itself, with a prior learned from a feature bottleneck
(Zhang, Khakzar, Li, Farshad, Kim, Navab, "Fine-Grained Neural Network Explanation by Identifying Input Features
with Predictive Information", NeurIPS 2021; App. A-D), on CLIP's two towers.

Per pair and modality, three steps (docs/methods.md):
(a) the feature bottleneck at layer ``k`` with the cosine fit term - the shared :class:`Bottleneck` exactly as
    M2IB runs it (β = ``feat_beta``);
(b) a generator ``Z_G = λ_G·u + (1−λ_G)·ε_G`` on the input ``u`` (pixels; token embeddings) fitted so that its
    layer-``k`` features follow the feature bottleneck's ``N(λh, (1−λ)²)`` (``prior_fit``: the paper's WGAN or the
    ``"moments"`` option, :mod:`clipib.attribution.input_prior`); ``λ_G`` starts from the feature mask (the mean
    ``λ`` over channels of each token, bilinearly upsampled to pixels);
(c) the input bottleneck ``Z_I = Λ·u + (1−Λ)·ε``, ``ε ~ N(μ_G, σ_G²)``, optimised with ``β_in·KL − cos``, the KL
    of App. A eq. 10 against the prior ``Z_G``. The map is ``Λ`` itself: one value per pixel ``[B, H, W]`` (shared
    by the three colour channels) and one per token ``[B, L]`` (shared by the embedding channels).

Defaults: InputIBA's reference ImageNet config (VGG-16) for the image: β_in = 20, 60 steps at lr 1, 10 noise copies
per step, α initialised to 5, GAN 20 epochs of 200 samples in batches of 32, RMSprop lr 5e-5, 5 critic steps per
generator step, weight clip 0.01; App. D.1 (IMDB) for the text: β_in = 30, 30 steps at lr 0.5. The feature layer
is VGG-16's conv4_1 (8th of 13 conv layers) scaled to the tower's depth; the feature bottleneck uses M2IB's
settings (β = 0.1, 10 steps at lr 1), because its fit term is M2IB's cosine, not the classifier's cross-entropy
the paper's β = 20 is tuned for.
"""

from __future__ import annotations

from typing import Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from clipib.attribution.base import Attributor, Scores
from clipib.attribution.bottleneck import Bottleneck
from clipib.attribution.input_prior import InputSpace, PriorFit, input_kl, normals
from clipib.models.split import SplitCLIP, fit_rows


class InputIBA(Attributor):
    """Input-level information bottleneck with a learned prior (InputIBA), image and text.

    Args:
        clip: the model.
        layer: feature bottleneck position; None = VGG-16 conv4_1's relative depth (8 of 13) scaled to the tower.
        beta_in, steps, lr: image input bottleneck (reference ImageNet config: 20, 60, 1.0).
        text_beta_in, text_steps, text_lr: text input bottleneck (App. D.1: 30, 30, 0.5).
        copies: noise draws per step, both bottlenecks (reference batch size: 10).
        alpha_init: initial logits of both bottlenecks' masks (reference: 5).
        feat_beta, feat_steps, feat_lr: the feature bottleneck (M2IB's: 0.1, 10, 1.0).
        prior_fit: ``"wgan"`` (paper) or ``"moments"`` (closed-form Gaussian W2, named option).
        gan_epochs, gan_samples, gan_batch, gan_lr, critic_iter, weight_clip, critic_width: the generator fit
            (reference: 20, 200, 32, 5e-5, 5, 0.01; the critic is clipib's token-wise MLP of width 64).
        moments_lr: Adam step of the ``"moments"`` fit.
        seed: noise seed of every pair when ``attribute`` gets no ``seeds``.
    """

    name = "input_iba"

    PAPER_LAYER, PAPER_DEPTH = 8, 13

    def __init__(
        self,
        clip: SplitCLIP,
        layer: Optional[int] = None,
        beta_in: float = 20.0,
        steps: int = 60,
        lr: float = 1.0,
        text_beta_in: float = 30.0,
        text_steps: int = 30,
        text_lr: float = 0.5,
        copies: int = 10,
        alpha_init: float = 5.0,
        feat_beta: float = 0.1,
        feat_steps: int = 10,
        feat_lr: float = 1.0,
        prior_fit: str = "wgan",
        gan_epochs: int = 20,
        gan_samples: int = 200,
        gan_batch: int = 32,
        gan_lr: float = 5e-5,
        critic_iter: int = 5,
        weight_clip: float = 0.01,
        critic_width: int = 64,
        moments_lr: float = 0.05,
        seed: int = 0,
    ) -> None:
        super().__init__(clip, seed=seed, layer=layer)
        if min(steps, text_steps, copies) < 1:
            raise ValueError("steps, text_steps and copies must be >= 1")
        self.image_setting = (beta_in, steps, lr)
        self.text_setting = (text_beta_in, text_steps, text_lr)
        self.copies, self.alpha_init, self.feat_beta = copies, alpha_init, feat_beta
        self.bottleneck = Bottleneck(steps=feat_steps, lr=feat_lr, copies=copies, alpha_init=alpha_init)
        self.prior = PriorFit(fit=prior_fit, epochs=gan_epochs, samples=gan_samples, batch=gan_batch, lr=gan_lr,
                              critic_iter=critic_iter, weight_clip=weight_clip, critic_width=critic_width,
                              moments_lr=moments_lr)

    def _feature_objective(self, emb: Tensor, target: Tensor, kl: Tensor) -> Tensor:
        return self.feat_beta * kl - (emb * target[:, None]).sum(-1).mean(1)

    def image_scores(self, images: Tensor, ids: Tensor, target: Tensor, generators: List[torch.Generator]) -> Scores:
        tower, k = self.clip.image, self.layer_for(self.clip.image)
        res = self.bottleneck.run(tower, images, k, target, generators, self._feature_objective)
        b, size = images.shape[0], tuple(images.shape[-2:])
        lam_grid = tower.to_grid(torch.sigmoid(res.alpha).mean(-1))  # [B, gh, gw]
        lam_px = F.interpolate(lam_grid[:, None], size=size, mode="bilinear", align_corners=False)  # [B, 1, H, W]

        def features(z: Tensor) -> Tensor:  # [B, n, 3, H, W] -> [B, n, T, D]
            return tower.prefix(z.flatten(0, 1), k).unflatten(0, z.shape[:2])

        def embed(z: Tensor) -> Tensor:  # [B, n, 3, H, W] -> [B, n, E]
            flat = z.flatten(0, 1)
            return tower.suffix(tower.embed(flat), 0, flat, pooled_only=True).unflatten(0, z.shape[:2])

        space = InputSpace(
            u=images, alpha_g=torch.logit(lam_px.clamp(1e-4, 1 - 1e-4)), mu=images.mean((2, 3), keepdim=True),
            sigma=images.std((2, 3), keepdim=True).clamp_min(1e-6), lengths=[images.shape[1]] * b,
            weights=torch.full_like(lam_px, 1.0 / (size[0] * size[1])), features=features, embed=embed)
        with torch.no_grad():
            h = tower.prefix(images, k)  # [B, T, D]
        valid = torch.ones(h.shape[:2], dtype=torch.bool, device=h.device)
        mask, scalars = self._input_step(space, h, res.alpha, valid, target, generators, self.image_setting)
        return mask[:, 0], {f"image_{key}": v for key, v in scalars.items()}  # [B, H, W]

    def text_scores(self, images: Tensor, ids: Tensor, target: Tensor, generators: List[torch.Generator]) -> Scores:
        tower, k = self.clip.text, self.layer_for(self.clip.text)
        length = tower.valid_length(ids)
        ids = ids[:, :length]
        valid = tower.span_mask(ids)  # [B, L]: the input space's tokens
        with torch.no_grad():
            h = tower.prefix(ids, k)  # [B, T, D]: T = L, or L + 1 (CoCa's class token)
        rows_valid = fit_rows(valid, h.shape[1])  # [B, T]
        res = self.bottleneck.run(tower, ids, k, target, generators, self._feature_objective, rows_valid)
        u = tower.token_embeddings(ids).detach()  # [B, L, D]
        w = valid.to(u.dtype)[..., None] / valid.sum(1)[:, None, None]  # [B, L, 1]
        mu = (u * w).sum(1, keepdim=True)  # [B, 1, D]
        sigma = (((u - mu) ** 2 * w).sum(1, keepdim=True)).sqrt().clamp_min(1e-6)
        lam_tok = torch.sigmoid(res.alpha[:, : ids.shape[1]]).mean(-1)[..., None]  # [B, L, 1]

        def features(z: Tensor) -> Tensor:  # [B, n, L, D] -> [B, n, T, D]
            rows = ids.repeat_interleave(z.shape[1], 0)
            return tower.run(tower.stream(z.flatten(0, 1)), 0, k, x=rows).unflatten(0, z.shape[:2])

        def embed(z: Tensor) -> Tensor:  # [B, n, L, D] -> [B, n, E]
            rows = ids.repeat_interleave(z.shape[1], 0)
            return tower.suffix(tower.stream(z.flatten(0, 1)), 0, rows, pooled_only=True).unflatten(0, z.shape[:2])

        space = InputSpace(u=u, alpha_g=torch.logit(lam_tok.clamp(1e-4, 1 - 1e-4)), mu=mu, sigma=sigma,
                           lengths=valid.sum(1).tolist(), weights=w, features=features, embed=embed)
        mask, scalars = self._input_step(space, h, res.alpha, rows_valid, target, generators, self.text_setting)
        return mask[..., 0].masked_fill(~valid, 0), {f"text_{key}": v for key, v in scalars.items()}  # [B, L]

    def _input_step(self, space: InputSpace, h: Tensor, alpha_f: Tensor, valid: Tensor, target: Tensor,
                    generators: List[torch.Generator], setting: Tuple[float, int, float]
                    ) -> Tuple[Tensor, Dict[str, Tensor]]:
        """Steps (b) and (c): the learned prior, then the input bottleneck; ``(Λ [B, *M], scalars)``."""
        alpha_g, mu_g, sigma_g, prior_loss = self.prior.run(space, h, alpha_f, valid, generators)
        beta, steps, lr = setting
        alpha = torch.full_like(space.alpha_g, self.alpha_init, requires_grad=True)
        opt = torch.optim.Adam([alpha], lr=lr)
        shape = tuple(space.u.shape[1:])
        for step in range(steps):
            eps = normals(generators, self.copies, space.lengths, shape, h.device)
            noise = mu_g[:, None] + sigma_g[:, None] * eps  # [B, C, *S]
            z = torch.sigmoid(alpha)[:, None] * space.u[:, None] + torch.sigmoid(-alpha)[:, None] * noise
            emb = space.embed(z)  # [B, C, E]
            kl = space.kl_mean(input_kl(alpha, alpha_g, space.u, mu_g, sigma_g))  # [B]
            fit = (emb * target[:, None]).sum(-1).mean(1)  # [B]
            loss = beta * kl - fit
            if step == steps - 1:
                break  # the map is the mask of this forward pass
            opt.zero_grad(set_to_none=True)
            loss.sum().backward()
            opt.step()
        shift = (alpha_g - space.alpha_g).abs().flatten(1).mean(1)  # [B] how far the fit moved the prior mask
        scalars = {"kl": kl.detach(), "fit": fit.detach(), "loss": loss.detach(), "prior_loss": prior_loss,
                   "prior_shift": shift}
        return torch.sigmoid(alpha.detach()), scalars
