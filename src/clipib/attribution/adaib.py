"""AdaIB: Adaptive Information Bottleneck attribution (anonymous, ICLR 2026 submission; no public code).

Objective per pair (Def. 1, eq. 4): maximise ``f·fit − g(f)·KL`` on the M2IB bottleneck
(:mod:`clipib.attribution.bottleneck`), i.e. minimise ``g·KL − f·fit``; ``fit`` is the mean cosine over the
noise copies between the bottlenecked embedding and the other modality's clean embedding (M2IB's fit term),
``KL`` M2IB's compression term. Settings (Sec. 5.1): 10 Adam steps at lr 1, 10 copies, the gradient norm
clipped at 1.0 — per pair, so a pair's result does not depend on its batch. The map is M2IB's (the last KL
summed over channels). The paper names no layer ("a specified layer", following M2IB and NIB): clipib uses
M2IB's, 10 of 12.

Relevance ``f`` (App. B.1 step 5): ``l2`` (default, Sec. 5.1), ``l1``, ``chebyshev``: ``1/(d + ε_f)`` with
``d`` the distance; ``cosine``: ``softplus(τ·(1+cos)/2) + ε_f``. **Which embeddings**: the paper does not
say. ``embeddings="normalized"`` (default) measures ``d`` between the L2-normalised embeddings (the space the
fit term's cosine lives in; ``d ≤ 2``, so l2's ``f ≥ 0.5``); ``embeddings="raw"`` between the projected
embeddings before the normalisation — App. E.1's reading ("L2 distance takes into account the strength
information of the feature (vector modulus)"), which only un-normalised vectors carry (``cosine`` is the same
either way). ``relevance_from="clean"`` (default) measures it between the clean embedding of the explained
input and the other modality's clean embedding — ``f(X, Y)`` of Def. 1, one constant per pair;
``relevance_from="bottleneck"`` between each noisy bottlenecked embedding and the target, averaged over copies
and recomputed (detached, a weight) every step.

Compression weight ``g``: ``inverse`` — ``1/(f + ε_g)``, App. B.1 eq. 13, the paper's only fully specified
``g`` and clipib's default; ``mlp`` — Sec. 5.1's learnable 1→32→1 ReLU MLP (App. E.2), ``g = ε_g +
softplus(u_φ(f))`` (Def. 2). The paper does not say how φ is trained, and maximising the objective over φ
drives ``g`` to ``ε_g`` (``∂L/∂g = −KL ≤ 0``: no compression). clipib's rule: one MLP per pair, the same
deterministic initialisation for every pair (``mlp_seed``), trained by Adam to regress ``log g`` onto
``log(1/(f + ε_g))`` — the closed form the paper derives (eq. 13), the non-increasing ``g(f)`` that Def. 1
asks for — ``mlp_warmup`` steps before the first bottleneck step, then one step per bottleneck step, so
with ``relevance_from="bottleneck"`` it tracks the relevance that the bottleneck still keeps. ``g`` enters
the bottleneck loss detached. ``mlp_joint`` — the literal reading: the MLP's parameters φ are optimised
jointly with α by the bottleneck's Adam (lr, steps) on the same per-pair loss ``g_φ(f)·KL − f·fit`` (``g`` not
detached), under the same global gradient-norm clip (α and φ together, per pair); no regression, φ starts
from its ``mlp_seed`` initialisation. Since ``∂loss/∂g = KL ≥ 0`` this drives ``g`` down towards ``ε_g``
(docs/methods.md has the measured trajectory). Table 7's architectures: ``mlp_hidden`` (an int = one hidden
layer of that width; a list = the hidden widths, ``[]`` = linear 1→1, ``[8, 8]`` = 1→8→8→1) and
``mlp_activation`` (``relu`` | ``tanh`` | ``none``), for both MLP rules. The MLP reads ``log f`` (f spans orders of magnitude across the relevance
options; ``log g ≈ −log f`` is then nearly linear). Within a few % of eq. 13, this ``g`` reproduces what
the paper specifies while keeping its learnable form; it cannot reproduce App. D's spread of ``g`` at equal
``f``, which depends on an unpublished rule. ε_f, ε_g and τ are not given in the paper; the defaults are
clipib's.

Proposition 1: with ``f`` and ``g`` constant (pass callables) and no clipping, AdaIB is M2IB with β = g/f
(Adam is invariant to the factor ``f`` up to its ε); ``tests/test_adaib.py`` checks it.
"""

from __future__ import annotations

import math
from typing import Callable, Dict, List, Literal, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from torch import Tensor

from clipib.attribution.base import Attributor, Scores
from clipib.attribution.bottleneck import Bottleneck, BottleneckResult
from clipib.attribution.m2ib import grad_scalars
from clipib.models.split import SplitCLIP, Tower

RelevanceFn = Callable[[Tensor, Tensor], Tensor]
"""``relevance(emb [..., E], target [..., E]) -> f [...]`` (positive)."""
CompressionFn = Callable[[Tensor], Tensor]
"""``compression(f [B]) -> g [B]`` (positive)."""
RELEVANCES = ("l2", "l1", "chebyshev", "cosine")
COMPRESSIONS = ("inverse", "mlp")
"""The compression rules whose ``g`` follows eq. 13 (closed form, or the MLP regressed onto it)."""
COMPRESSION_OPTIONS = COMPRESSIONS + ("mlp_joint",)
"""Every named compression rule: :data:`COMPRESSIONS` and the jointly trained MLP."""
EMBEDDINGS = ("normalized", "raw")
ACTIVATIONS: Dict[str, Callable[[Tensor], Tensor]] = {"relu": torch.relu, "tanh": torch.tanh, "none": lambda x: x}


def make_relevance(name: str, eps_f: float, tau: float) -> RelevanceFn:
    """The relevance ``f`` named ``name`` (App. B.1 step 5) between two embeddings (normalised or raw)."""
    if name == "cosine":
        return lambda a, b: F.softplus(tau * (1 + F.cosine_similarity(a, b, dim=-1)) / 2) + eps_f
    orders = {"l2": 2.0, "l1": 1.0, "chebyshev": math.inf}
    if name not in orders:
        raise ValueError(f"relevance must be one of {RELEVANCES} or a callable, got {name!r}")
    p = orders[name]
    return lambda a, b: 1.0 / (torch.linalg.vector_norm(a - b, ord=p, dim=-1) + eps_f)


def mlp_widths(hidden: Union[int, Sequence[int]]) -> List[int]:
    """Hidden widths of an ``mlp_hidden`` setting: an int = one hidden layer, a list = the widths (``[]`` = linear)."""
    widths = [hidden] if isinstance(hidden, int) else list(hidden)
    if not all(isinstance(w, int) and not isinstance(w, bool) and w >= 1 for w in widths):
        raise ValueError(f"mlp_hidden must be an int >= 1 or a list of them, got {hidden!r}")
    return widths


class PairMLPs:
    """``B`` independent MLPs 1→H₁→…→1 (one per pair), ``g = ε_g + softplus(u(log f))`` (Def. 2).

    ``hidden``: an int (one hidden layer, the paper's 1→32→1) or a list of widths (``[]`` = linear 1→1);
    ``activation`` after every hidden layer: ``relu`` (paper), ``tanh`` or ``none`` (Table 7).
    Every pair starts from the same weights, drawn layer by layer (weight ``[out, in]``, then bias) like
    ``nn.Linear``'s default initialisation from a generator seeded with ``seed``; each is trained by Adam on its
    own pair's loss only. Parameters (``params``: weight ``[B, out, in]``, bias ``[B, out]`` per layer) live in
    float32 on ``like``'s device whatever the model's dtype.
    """

    def __init__(self, batch: int, hidden: Union[int, Sequence[int]], eps_g: float, lr: float, seed: int,
                 like: Tensor, activation: str = "relu") -> None:
        if activation not in ACTIVATIONS:
            raise ValueError(f"mlp_activation must be one of {tuple(ACTIVATIONS)}, got {activation!r}")
        dims = [1, *mlp_widths(hidden), 1]
        gen = torch.Generator().manual_seed(seed)
        init = []
        for fan_in, fan_out in zip(dims[:-1], dims[1:]):
            bound = 1.0 / math.sqrt(fan_in)
            init.append(((torch.rand(fan_out * fan_in, generator=gen) * 2 - 1) * bound).view(fan_out, fan_in))
            init.append((torch.rand(fan_out, generator=gen) * 2 - 1) * bound)
        self.params = [p.to(like.device)[None].repeat(batch, *[1] * p.ndim).requires_grad_(True) for p in init]
        self.act = ACTIVATIONS[activation]
        self.eps_g = eps_g
        self.opt = torch.optim.Adam(self.params, lr=lr)

    def __call__(self, f: Tensor) -> Tensor:
        """``g`` ``[B]`` (float32) of each pair's MLP at its own ``f`` ``[B]``."""
        x = f.float().log()[:, None]  # [B, 1], input log f
        n = len(self.params) // 2
        for i in range(n):
            w, b = self.params[2 * i], self.params[2 * i + 1]  # [B, out, in], [B, out]
            x = (w * x[:, None, :]).sum(-1) + b
            if i < n - 1:
                x = self.act(x)
        return self.eps_g + F.softplus(x[:, 0])

    def regress(self, f: Tensor, target: Tensor) -> None:
        """One Adam step on ``Σ_pairs (log g(f) − log target)²`` (pairs are independent)."""
        with torch.enable_grad():
            loss = ((self(f).log() - target.float().log()) ** 2).sum()
            self.opt.zero_grad(set_to_none=True)
            loss.backward()
        self.opt.step()


class AdaptiveObjective:
    """``g·KL − f·fit`` per pair for :meth:`Bottleneck.run`; remembers the last ``f`` and ``g``.

    ``f_clean`` ``[B]`` is the constant relevance (``relevance_from="clean"``) or None (recomputed from the
    bottlenecked embeddings every call: the raw ones, against ``target_raw``, when the bottleneck passes
    ``raw=``). ``compression`` is a function of ``f`` or a :class:`PairMLPs` — regressed onto ``1/(f + ε_g)``
    ``warmup`` times before the first call's ``g`` and once after each call, or, with ``joint``, left to the
    bottleneck's optimiser (``g`` then keeps its graph to the MLP's parameters).
    """

    def __init__(self, relevance_fn: RelevanceFn, compression: Union[CompressionFn, PairMLPs],
                 f_clean: Optional[Tensor], eps_g: float, warmup: int = 0, joint: bool = False,
                 target_raw: Optional[Tensor] = None) -> None:
        self.relevance_fn, self.compression, self.f_clean, self.eps_g = relevance_fn, compression, f_clean, eps_g
        self.warmup, self.joint, self.target_raw = warmup, joint, target_raw
        self.f: Optional[Tensor] = None
        self.g: Optional[Tensor] = None

    def __call__(self, emb: Tensor, target: Tensor, kl: Tensor, raw: Optional[Tensor] = None) -> Tensor:
        if self.f_clean is None:
            a, b = (emb, target) if raw is None else (raw, self.target_raw)
            with torch.no_grad():
                f = self.relevance_fn(a, b[:, None].expand_as(a)).mean(1)  # [B]
        else:
            f = self.f_clean
        if self.joint:
            g = self.compression(f)  # [B], graph to φ: trained with α on this loss
        else:
            g = self._regressed_g(f)
        self.f, self.g = f, g.detach()
        fit = (emb * target[:, None]).sum(-1).mean(1)  # [B]
        return g * kl - f * fit

    def _regressed_g(self, f: Tensor) -> Tensor:
        mlp = self.compression if isinstance(self.compression, PairMLPs) else None
        if mlp is not None:
            for _ in range(self.warmup if self.f is None else 0):
                mlp.regress(f, 1.0 / (f + self.eps_g))
        with torch.no_grad():
            g = self.compression(f)  # [B]
        if mlp is not None:
            mlp.regress(f, 1.0 / (f + self.eps_g))
        return g


class AdaIB(Attributor):
    """Adaptive information bottleneck: loss ``g(f)·KL − f·fit`` per pair, map = last KL summed over channels.

    Args:
        clip: the model.
        layer: bottleneck position; None = M2IB's 10 of 12 (the paper names none), scaled to the tower.
        relevance: ``"l2"`` (paper default), ``"l1"``, ``"chebyshev"``, ``"cosine"``, or a callable
            ``(emb [..., E], target [..., E]) -> f [...]``.
        compression: ``"inverse"`` (eq. 13, default), ``"mlp"`` (App. E.2, regression rule above),
            ``"mlp_joint"`` (the MLP trained jointly with α on the loss, the literal reading), or a callable
            ``f [B] -> g [B]``.
        relevance_from: ``"clean"`` (f of the clean embeddings, default) or ``"bottleneck"`` (f of the
            bottlenecked embeddings each step).
        embeddings: ``"normalized"`` (f between L2-normalised embeddings, default) or ``"raw"`` (between the
            projected embeddings before normalisation: App. E.1's "vector modulus").
        eps_f, eps_g, tau: ε_f, ε_g and τ of App. B.1 (not given in the paper).
        steps, lr, copies, clip_grad: optimisation (paper: 10, 1.0, 10, 1.0; ``clip_grad=None`` turns it off).
        seed: noise seed of every pair when ``attribute`` gets no ``seeds`` (paper: runs with 42-46).
        alpha_init: initial α (M2IB's reference: 5).
        mlp_hidden, mlp_lr, mlp_warmup, mlp_seed: the MLP's hidden width(s) (paper: 32; a list for Table 7's
            deeper ones, ``[]`` = linear), the regression's Adam step size and steps before the first bottleneck
            step (``mlp`` only; ``mlp_joint`` uses the bottleneck's Adam), and the initialisation seed.
        mlp_activation: after each hidden layer, ``"relu"`` (paper), ``"tanh"`` or ``"none"`` (Table 7).
        record_grad_norm: add ``{image,text}_grad_norm`` (mean over the updates of the per-pair L2 norm of the
            gradient before clipping: α's, plus φ's under ``mlp_joint``), ``_grad_norm_max`` and ``_clipped``
            (the fraction of updates the clip scaled down) to the scalars.
    """

    name = "adaib"

    PAPER_LAYER, PAPER_DEPTH = 10, 12

    def __init__(
        self,
        clip: SplitCLIP,
        layer: Optional[int] = None,
        relevance: Union[str, RelevanceFn] = "l2",
        compression: Union[str, CompressionFn] = "inverse",
        relevance_from: Literal["clean", "bottleneck"] = "clean",
        eps_f: float = 1e-3,
        eps_g: float = 1e-3,
        tau: float = 1.0,
        steps: int = 10,
        lr: float = 1.0,
        copies: int = 10,
        clip_grad: Optional[float] = 1.0,
        seed: int = 42,
        alpha_init: float = 5.0,
        mlp_hidden: Union[int, List[int]] = 32,
        mlp_lr: float = 0.05,
        mlp_warmup: int = 50,
        mlp_seed: int = 0,
        embeddings: Literal["normalized", "raw"] = "normalized",
        mlp_activation: Literal["relu", "tanh", "none"] = "relu",
        record_grad_norm: bool = False,
    ) -> None:
        super().__init__(clip, seed=seed, layer=layer)
        if not callable(compression) and compression not in COMPRESSION_OPTIONS:
            raise ValueError(f"compression must be one of {COMPRESSION_OPTIONS} or a callable, got {compression!r}")
        if relevance_from not in ("clean", "bottleneck"):
            raise ValueError(f"relevance_from must be 'clean' or 'bottleneck', got {relevance_from!r}")
        if embeddings not in EMBEDDINGS:
            raise ValueError(f"embeddings must be one of {EMBEDDINGS}, got {embeddings!r}")
        if mlp_activation not in ACTIVATIONS:
            raise ValueError(f"mlp_activation must be one of {tuple(ACTIVATIONS)}, got {mlp_activation!r}")
        mlp_widths(mlp_hidden)
        if min(eps_f, eps_g, tau) <= 0:
            raise ValueError("eps_f, eps_g and tau must be > 0")
        self.relevance, self.compression, self.relevance_from = relevance, compression, relevance_from
        self.relevance_fn: RelevanceFn = relevance if callable(relevance) else make_relevance(relevance, eps_f, tau)
        self.eps_f, self.eps_g, self.tau = eps_f, eps_g, tau
        self.mlp_hidden, self.mlp_lr, self.mlp_warmup, self.mlp_seed = mlp_hidden, mlp_lr, mlp_warmup, mlp_seed
        self.mlp_activation, self.embeddings, self.record_grad_norm = mlp_activation, embeddings, record_grad_norm
        self.bottleneck = Bottleneck(steps=steps, lr=lr, copies=copies, alpha_init=alpha_init, clip_grad=clip_grad)

    def _compression(self, batch: int, like: Tensor) -> Union[CompressionFn, PairMLPs]:
        if callable(self.compression):
            return self.compression
        if self.compression == "inverse":
            return lambda f: 1.0 / (f + self.eps_g)
        return PairMLPs(batch, self.mlp_hidden, self.eps_g, self.mlp_lr, self.mlp_seed, like, self.mlp_activation)

    def run(self, modality: str, tower: Tower, x: Tensor, target: Tensor, generators: List[torch.Generator],
            valid: Optional[Tensor] = None, target_raw: Optional[Tensor] = None,
            ) -> Tuple[BottleneckResult, Dict[str, Tensor]]:
        """Optimise the bottlenecks of ``tower`` on ``x`` against ``target`` ``[B, E]``: the result and its scalars.

        ``target_raw`` ``[B, E]``: the other modality's embedding before normalisation (``embeddings="raw"``).
        """
        raw = self.embeddings == "raw"
        if raw and target_raw is None:
            raise ValueError("embeddings='raw' needs the other modality's raw embedding (target_raw)")
        f_clean = None
        if self.relevance_from == "clean":
            with torch.no_grad():
                f_clean = (self.relevance_fn(tower.encode(x, normalize=False), target_raw) if raw
                           else self.relevance_fn(tower.encode(x), target))  # [B]
        compression = self._compression(x.shape[0], target)
        joint = self.compression == "mlp_joint"
        objective = AdaptiveObjective(self.relevance_fn, compression, f_clean, self.eps_g, self.mlp_warmup,
                                      joint=joint, target_raw=target_raw)
        extra = compression.params if joint else ()
        res = self.bottleneck.run(tower, x, self.layer_for(tower), target, generators, objective, valid,
                                  extra_params=extra, raw=raw and f_clean is None)
        terms = {"f": objective.f, "g": objective.g, "fit": res.fit, "kl": res.kl, "loss": res.loss,
                 "beta": objective.g / objective.f}
        scalars = {f"{modality}_{key}": value.detach() for key, value in terms.items()}
        if self.record_grad_norm:
            scalars.update(grad_scalars(modality, res))
        return res, scalars

    def _raw(self, tower: Tower, x: Tensor) -> Optional[Tensor]:
        if self.embeddings != "raw":
            return None
        with torch.no_grad():
            return tower.encode(x, normalize=False)

    def image_scores(self, images: Tensor, ids: Tensor, target: Tensor, generators: List[torch.Generator]) -> Scores:
        res, scalars = self.run("image", self.clip.image, images, target, generators,
                                target_raw=self._raw(self.clip.text, ids))
        return self.clip.image.to_grid(res.capacity), scalars  # prefix tokens dropped: [B, gh, gw]

    def text_scores(self, images: Tensor, ids: Tensor, target: Tensor, generators: List[torch.Generator]) -> Scores:
        res, scalars = self.run("text", self.clip.text, ids, target, generators, self.clip.text.span_mask(ids),
                                target_raw=self._raw(self.clip.image, images))
        return res.capacity, scalars  # [B, L]
