"""InputIBA's input-level pieces (Zhang et al., NeurIPS 2021, App. A): the KL against the learned prior Z_G, and
the generator that learns that prior from a feature-level bottleneck.

The input space is a tensor ``u [B, *S]`` (pixels ``[B, 3, H, W]`` or token embeddings ``[B, L, D]``); a mask
``Λ = sigmoid(α)`` of shape ``[B, *M]`` (``M`` is ``S`` with broadcast dimensions of size 1: one value per pixel,
one per token) and noise ``ε ~ N(μ, σ²)`` with per-channel ``μ, σ``.

Generator (Sec. 3.2): ``Z_G = λ_G·u + (1−λ_G)·(μ_G + σ_G·ε)``, with ``λ_G, μ_G, σ_G`` learned per pair so that the
layer-``k`` features of ``Z_G`` follow the feature bottleneck's masked distribution ``N(λh, (1−λ)²)``. Two fits:
``"wgan"`` (the paper's: a Wasserstein critic with weight clipping, RMSprop) and ``"moments"`` (clipib's named
option: the target is a known diagonal Gaussian, so the closed-form squared 2-Wasserstein distance between it and
the per-element Gaussian of the generated features is minimised directly - no critic, no adversarial game).

Batching: each pair has its own generator parameters and its own critic; losses are sums of per-pair losses and
both optimisers are element-wise, so a pair follows the trajectory it would follow alone.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, List, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

PRIOR_FITS = ("wgan", "moments")


def input_kl(alpha: Tensor, alpha_g: Tensor, u: Tensor, mu: Tensor, sigma: Tensor) -> Tensor:
    """App. A eq. 10 per element: ``KL(P(Z_I|I) ‖ P(Z_I))`` with the posterior of eq. 8 and the prior of eq. 9.

    ``Λ = sigmoid(alpha)``, ``λ_G = sigmoid(alpha_g)``, all arguments broadcast together:
    ``log((1−λ_GΛ)/(1−Λ)) + (1−Λ)²/(2(1−λ_GΛ)²) + (u−μ)²(Λ−λ_GΛ)²/(2(1−λ_GΛ)²σ²) − 1/2``.
    ``1−Λ = sigmoid(−alpha)`` and ``1−λ_GΛ = (1−Λ) + Λ(1−λ_G)`` keep it finite for any logits.
    """
    lam, one_minus = torch.sigmoid(alpha), torch.sigmoid(-alpha)
    prior_gap = one_minus + lam * torch.sigmoid(-alpha_g)  # 1 − λ_G Λ
    shift = lam * torch.sigmoid(-alpha_g)  # Λ − λ_G Λ
    return (torch.log(prior_gap) - F.logsigmoid(-alpha) + one_minus**2 / (2 * prior_gap**2)
            + (u - mu) ** 2 * shift**2 / (2 * prior_gap**2 * sigma**2) - 0.5)


def normals(generators: List[torch.Generator], n: int, lengths: List[int], shape: Tuple[int, ...],
            device: torch.device) -> Tensor:
    """``[B, n, *shape]`` standard normals, pair ``i`` drawing ``[n, lengths[i], *shape[1:]]`` on the CPU from its
    own generator (rows past ``lengths[i]`` are 0)."""
    out = torch.zeros(len(generators), n, *shape)
    for i, (g, m) in enumerate(zip(generators, lengths)):
        out[i, :, :m] = torch.randn(n, m, *shape[1:], generator=g)
    return out.to(device)


@dataclass
class InputSpace:
    """What the input-level steps need of one modality.

    Attributes:
        u: ``[B, *S]`` the masked input. alpha_g: ``[B, *M]`` initial generator mask logits.
        mu, sigma: ``[B, *M']`` per-channel noise statistics (broadcast to ``S``).
        lengths: per pair, the valid extent of dimension 1 of ``S`` (tokens; channels for pixels).
        weights: ``[B, *M]`` averaging weights over valid mask positions (each pair's sum is 1).
        features: ``(z [B, n, *S]) -> [B, n, T, D]`` layer-``k`` features.
        embed: ``(z [B, n, *S]) -> [B, n, E]`` normalised embedding.
    """

    u: Tensor
    alpha_g: Tensor
    mu: Tensor
    sigma: Tensor
    lengths: List[int]
    weights: Tensor
    features: Callable[[Tensor], Tensor]
    embed: Callable[[Tensor], Tensor]

    def kl_mean(self, kl_el: Tensor) -> Tensor:
        """Mean of element-wise KL ``[B, *S]`` over channels and valid mask positions: ``[B]``."""
        per_mask = kl_el.mean(dim=[d for d in range(1, kl_el.ndim) if self.weights.shape[d] == 1], keepdim=True)
        return (per_mask * self.weights).flatten(1).sum(1)


@dataclass
class PriorFit:
    """Settings of the generator fit (defaults: InputIBA reference configs for ImageNet, App. D.1).

    ``epochs`` passes over ``samples`` generated inputs in batches of ``batch``; ``fit="wgan"``: RMSprop at ``lr``,
    a critic step per batch, a generator step every ``critic_iter`` batches, critic weights clipped to
    ``±weight_clip``, critic width ``critic_width``; ``fit="moments"``: Adam at ``moments_lr``, one step per batch.
    """

    fit: str = "wgan"
    epochs: int = 20
    samples: int = 200
    batch: int = 32
    lr: float = 5e-5
    critic_iter: int = 5
    weight_clip: float = 0.01
    critic_width: int = 64
    moments_lr: float = 0.05

    def __post_init__(self) -> None:
        if self.fit not in PRIOR_FITS:
            raise ValueError(f"prior_fit must be one of {PRIOR_FITS}, got {self.fit!r}")
        if self.batch < 2 or self.epochs < 0 or self.samples < 1 or self.critic_iter < 1:
            raise ValueError("gan_batch must be >= 2, gan_epochs >= 0, gan_samples >= 1, critic_iter >= 1")

    def run(self, space: InputSpace, h: Tensor, alpha_f: Tensor, valid: Tensor,
            generators: List[torch.Generator]) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
        """Fit each pair's generator to ``N(λh, (1−λ)²)``, ``λ = sigmoid(alpha_f)`` (``h, alpha_f [B, T, D]``,
        ``valid [B, T]``).

        Returns ``(alpha_g, mu_g, sigma_g, loss [B])``: the learned prior and the last generator loss.
        """
        alpha_g = space.alpha_g.clone().requires_grad_(True)
        mu_g = space.mu.clone().requires_grad_(True)
        log_sigma = space.sigma.log().requires_grad_(True)
        params = [alpha_g, mu_g, log_sigma]
        lam, one_minus = torch.sigmoid(alpha_f), torch.sigmoid(-alpha_f)
        weights = valid.to(h.dtype) / valid.sum(1, keepdim=True)  # [B, T]
        if self.fit == "moments":
            opt = torch.optim.Adam(params, lr=self.moments_lr)
        else:
            opt = torch.optim.RMSprop(params, lr=self.lr)
            critic = _Critic(h.shape[0], h.shape[-1], self.critic_width, generators, h.device)
            critic_opt = torch.optim.RMSprop(critic.params, lr=self.lr)
        loss = h.new_zeros(h.shape[0])
        lengths_t = valid.sum(1).tolist()
        for it in range(self.epochs * math.ceil(self.samples / self.batch)):
            eps = normals(generators, self.batch, space.lengths, tuple(space.u.shape[1:]), h.device)
            z = torch.sigmoid(alpha_g)[:, None] * space.u[:, None] + torch.sigmoid(-alpha_g)[:, None] * (
                mu_g[:, None] + log_sigma.exp()[:, None] * eps)  # [B, n, *S]
            if self.fit == "moments":
                f = space.features(z)  # [B, n, T, D]
                w2 = (f.mean(1) - lam * h) ** 2 + (f.std(1) - one_minus) ** 2  # [B, T, D]
                loss = (w2.mean(-1) * weights).sum(-1)
                opt.zero_grad(set_to_none=True)
                loss.sum().backward()
                opt.step()
                continue
            real_eps = normals(generators, self.batch, lengths_t, tuple(h.shape[1:]), h.device)
            real = lam[:, None] * h[:, None] + one_minus[:, None] * real_eps  # [B, n, T, D]
            with torch.no_grad():
                fake = space.features(z)
            critic_loss = critic(fake, weights).mean(1) - critic(real, weights).mean(1)  # [B]
            critic_opt.zero_grad(set_to_none=True)
            critic_loss.sum().backward()
            critic_opt.step()
            critic.clip(self.weight_clip)
            if (it + 1) % self.critic_iter == 0:
                loss = -critic(space.features(z), weights).mean(1)  # [B]
                opt.zero_grad(set_to_none=True)
                loss.sum().backward()
                opt.step()
        return alpha_g.detach(), mu_g.detach(), log_sigma.detach().exp(), loss.detach()


class _Critic:
    """One Wasserstein critic per pair: a token-wise MLP ``D → width → 1`` averaged over valid tokens."""

    def __init__(self, b: int, d: int, width: int, generators: List[torch.Generator], device: torch.device) -> None:
        draw = [torch.randn(d * width + width, generator=g) for g in generators]  # per pair, its own stream
        w = torch.stack(draw).to(device)
        self.w1 = (w[:, : d * width].view(b, d, width) / math.sqrt(d)).requires_grad_(True)  # [B, D, W]
        self.w2 = (w[:, d * width:].view(b, width, 1) / math.sqrt(width)).requires_grad_(True)  # [B, W, 1]
        self.params = [self.w1, self.w2]

    def __call__(self, f: Tensor, weights: Tensor) -> Tensor:
        """Scores ``[B, n]`` of features ``f [B, n, T, D]``."""
        hidden = F.leaky_relu(torch.einsum("bntd,bdw->bntw", f, self.w1), 0.2)
        per_token = torch.einsum("bntw,bwo->bnto", hidden, self.w2)[..., 0]  # [B, n, T]
        return (per_token * weights[:, None]).sum(-1)

    def clip(self, c: float) -> None:
        """WGAN weight clipping to ``[−c, c]``."""
        with torch.no_grad():
            for p in self.params:
                p.clamp_(-c, c)
