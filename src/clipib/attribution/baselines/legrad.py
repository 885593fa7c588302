"""LeGrad (Bousselham, Boggust, Chaybouti, Strobelt, Kuehne; ICCV 2025, arXiv 2404.03214), image side.

LeGrad explains how each layer *forms* the feature that matches the text: for every chosen block ``l`` it
reads the layer's tokens out as an embedding (logit-lens style), scores it against the text, and takes the
gradient of that score with respect to the block's own attention map as the explanation signal:

* ``z_l`` = residual stream after block ``l`` (``tower.run(h_l, l, l + 1)``);
* ``s_l = cos(Head(z_l), e_text)`` — ``Head`` is the tower's own final norm, pooling and projection
  (``tower.head``), so the score of the last block is the model's similarity [LG-score: the intermediate
  tokens are mapped to the joint space by the model's own head];
* ``∇A_l = ∂s_l / ∂A_l`` with ``A_l`` ``[B, heads, T, T]`` the attention probabilities of block ``l``
  (explicit-attention path ``attn_hook``); ``s_l`` depends on ``A_l`` through block ``l`` and the head only;
* ``E_l = mean_heads mean_queries ReLU(∇A_l)`` ``[B, T]`` [LG-layer: only positive gradients, averaged
  over heads and over every query row];
* ``E = Σ_l E_l`` over the chosen layers [LG-sum], read on the patch columns (class / register tokens
  dropped); the public map is its min-max normalisation (``to_maps``, as the package's).

The bracketed tags are clipib's names for the steps; they are not the paper's equation numbers.

What was checked, and against what (offline, 2026-12-02). The paper's method section (arXiv 2404.03214 v1/v2,
ICCV 2025 pp. 20336-20345) could not be read here: only its abstract (arXiv v1/v2 pages, the ICCV open-access
page) was available, so **no equation number is cited and none was verified**. The abstract confirms: the
explanation signal is the gradient with respect to the attention maps of single ViT layers; the signal is
aggregated over all layers, combining the activations of the last and of intermediate tokens. Every other step
was checked against the authors' package ``WalBouss/LeGrad`` (``legrad/wrapper.py`` at 8c2ca90,
``legrad/utils.py`` at c5c7b20), not against the paper: ``A_l`` is the post-softmax attention of block ``l``;
``s_l`` is the similarity of the text embedding with the L2-normalised embedding read from block ``l``'s output
(CoCa: not normalised, below);
the gradient is clamped at 0 (ReLU), averaged over heads and then over every query row, the class column is
dropped, the layer maps are summed (not averaged) and min-max normalised per map.

Default layers: the last two blocks (``layers=2``: the package's ``LeWrapper(layer_index=-2)``);
``layers="all"`` aggregates every block (the abstract's "over all layers").

Read-out (``readout``). The default ``"head"`` is clipib's: every tower family is explained the same way, each
chosen block's output read by the tower's own head, its self-attention differentiated (above).
``readout="package"`` reproduces the package's per-family computation (facts from ``legrad/wrapper.py``
``compute_legrad_clip`` / ``_coca`` / ``_siglip`` and the hooks in ``legrad/utils.py``; clipib's own code):

* open_clip ViTs without an attentional pooler (CLS or patch-mean towers; ``compute_legrad_clip``):
  ``s_l = cos(normalize(ln_post(mean over every row of z_l, class token included) @ proj), e_text)``
  (:meth:`~clipib.models.split.ImageTower.mean_token_embedding`); ``A_l`` = block ``l``'s self-attention; ReLU,
  mean over heads, then over every query row, class column dropped, summed over layers — the steps above.
* CoCa (open_clip ViT with its attentional pooler; ``compute_legrad_coca``): block ``l``'s output goes through
  the pooler *without* ``ln_post``; ``s_l = <attn_pool(z_l)[query 0] @ proj, e_text>``, a dot product with the
  unnormalised image embedding (the package normalises only the text); ``A_l`` = the *pooler's* attention
  probabilities ``[B, heads, queries, T]``; ``E_l`` = ReLU, mean over heads, the row of query 0, class column
  dropped; summed over layers. (:meth:`~clipib.models.split.ImageTower.attention_pool` with
  ``final_norm=False``.)
* timm MAP towers (SigLIP, SigLIP 2; ``compute_legrad_siglip``): block ``l``'s output goes through the MAP head
  *without* the trunk's final ``norm``; ``s_l = cos(normalize(attn_pool(z_l)), e_text)``; ``A_l`` = the MAP
  head's attention probabilities ``[B, heads, latents, n]``; ``E_l`` = ReLU, mean over heads, the first latent's
  row; summed over layers. Correction (``correction``; the package's default ``apply_correction=True``,
  ``correction_threshold=0.8``): the same map for the fixed prompt ``"a photo of a"`` (its embedding
  L2-normalised), min-max normalised over the patches; the main map is set to 0 wherever that map exceeds
  the threshold, before the final min-max. ``correction=None`` (default) applies it exactly where the package
  does (``readout="package"`` on a timm MAP tower); it needs the model's tokenizer (``clip.tokenize``) and is
  refused with one clear error where there is none, or where it gives ids outside the text tower's vocabulary.

Where ``readout="package"`` still differs from the package, named: each pair is scored against its own text
(the package sums the similarities of every prompt-image combination of its batch on CoCa / SigLIP: the same
for one image and one prompt, as in its demos); the correction prompt is tokenized by the model's own
tokenizer (the package always uses ViT-B-16-SigLIP's T5 tokenizer, which feeds SigLIP 2's Gemma-vocabulary
tower foreign ids); clipib's pixel map is ``to_maps``' bilinear upsampling then min-max, where the package's
SigLIP path min-maxes on the grid first (an affine change of the same map: same ranking and argmax). Where the
package has no path, clipib generalises: timm MAP towers with a head after the pooler (PE-Core) keep that head
(identity on SigLIP); CoCa's 'parallel' pooler reads its contrastive pooler (the package's code would read
the captioning pooler). Timm towers pooled ``tok`` / ``avg`` (EVA-02) have no package path and are refused.

Differences of the default (``readout="head"``) from the package, named (why: one definition on every tower —
each layer read as the model reads its last one, and the blocks' self-attention explained everywhere):

* CLS / patch-mean towers (open_clip ViTs, clipib-shapes): the package reads block ``l``'s output as
  ``ln_post(mean of every token, class token included) @ proj``; clipib applies the tower's own head
  (``tower.head``: the class token, or the patch mean on ``avg``-pooled ViTs).
* MAP-pooled towers (SigLIP / SigLIP 2 timm trunks; CoCa's attentional pooler): the package differentiates
  the MAP head's attention (above) and, on SigLIP, applies the "a photo of a" correction; clipib explains the
  blocks' self-attention with the tower's own head (final norm and MAP pooling included) and no correction.
* Text: not attributed (the paper explains images).

Whether the package's read-outs are the paper's could not be checked: its method section was not readable here.
"""

from __future__ import annotations

from typing import Callable, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from torch import Tensor

from clipib.attribution.base import Attributor, Scores, minmax
from clipib.attribution.common import cosine
from clipib.models.loading import ModelLoadError
from clipib.models.split import SplitCLIP, TimmImageTower, Tower

READOUTS = ("head", "package")
"""``LeGrad(readout=...)``: ``"head"`` (clipib's, default) or ``"package"`` (the authors' package's)."""
CORRECTION_PROMPT = "a photo of a"
"""The fixed prompt of the package's SigLIP correction."""


class LeGrad(Attributor):
    """LeGrad: positive gradients of each layer's similarity w.r.t. its attention map, summed over layers.

    Args:
        clip: the model.
        layers: how many of the last blocks to aggregate (default 2, the maintained package's), or ``"all"``.
        seed: unused (deterministic); kept for the common constructor.
        readout: ``"head"`` (default: each block read by the tower's own head, its self-attention
            differentiated, on every tower) or ``"package"`` (the package's per-family read-out and attention;
            module docstring).
        correction: the package's SigLIP correction with the prompt "a photo of a" (``readout="package"`` on
            timm MAP towers only). None (default): on exactly where the package applies it.
        correction_threshold: the correction zeroes the map where the prompt's min-max map exceeds this (0.8).
    """

    name = "legrad"
    modalities = ("image",)

    def __init__(self, clip: SplitCLIP, layers: Union[int, str] = 2, seed: int = 0, readout: str = "head",
                 correction: Optional[bool] = None, correction_threshold: float = 0.8) -> None:
        super().__init__(clip, seed=seed)
        if layers != "all" and (isinstance(layers, bool) or not isinstance(layers, int) or layers < 1):
            raise ValueError(f"layers must be a positive int or 'all', got {layers!r}")
        if readout not in READOUTS:
            raise ValueError(f"readout must be one of {READOUTS}, got {readout!r}")
        if correction not in (None, True, False):
            raise ValueError(f"correction must be True, False or None (as the package), got {correction!r}")
        if correction and readout != "package":
            raise ValueError("correction is a step of the package's SigLIP path: use it with readout='package'")
        if not 0.0 <= float(correction_threshold) <= 1.0:
            raise ValueError(f"correction_threshold must be in [0, 1], got {correction_threshold!r}")
        self.layers = layers
        self.readout = readout
        self.correction = correction
        self.correction_threshold = float(correction_threshold)

    def first_layer(self, tower: Tower) -> int:
        """Index of the first aggregated block."""
        return 0 if self.layers == "all" else max(0, tower.n_layers - int(self.layers))

    def _pool_attention(self, tower: Tower) -> bool:
        """Whether the differentiated attention is the MAP head's (the package on attention-pooled towers)."""
        return self.readout == "package" and getattr(tower, "pool_type", "") == "map"

    def corrects(self, tower: Tower) -> bool:
        """Whether the "a photo of a" correction applies on ``tower`` (ValueError where it is asked for and the
        package has no such step)."""
        timm_map = self._pool_attention(tower) and isinstance(tower, TimmImageTower)
        if self.correction and not timm_map:
            raise ValueError("correction=True: the package corrects only on timm MAP towers (SigLIP); this tower "
                             f"is {type(tower).__name__} pooled '{getattr(tower, 'pool_type', '?')}'")
        return timm_map if self.correction is None else bool(self.correction)

    def _check_tower(self, tower: Tower) -> None:
        if self.readout == "package" and isinstance(tower, TimmImageTower) and tower.pool_type != "map":
            raise ValueError(f"readout='package': the package has no path for timm towers pooled "
                             f"'{tower.pool_type}' (it explains MAP-pooled SigLIP trunks); use readout='head'")

    def _read(self, tower: Tower, x: Tensor, h: Tensor, layer: int,
              keep: Callable[[int, Tensor], Tensor]) -> Tuple[Tensor, Tensor, bool]:
        """Block ``layer`` on ``h``: ``(embedding [B, E], block output z_l, normalised?)``; the attention to
        differentiate passes through ``keep`` (block ``layer``'s, or the MAP head's on the package's MAP path)."""
        if self.readout == "head":
            z = tower.run(h, layer, layer + 1, attn_hook=keep)
            return tower.head(z, x), z, True  # [LG-score]
        if not self._pool_attention(tower):  # the package's CLS path: ln_post(mean of every token) @ proj
            z = tower.run(h, layer, layer + 1, attn_hook=keep)
            return tower.mean_token_embedding(z), z, True
        with torch.no_grad():
            z = tower.run(h, layer, layer + 1)
        unit = isinstance(tower, TimmImageTower)  # timm: normalised; CoCa: the raw pooled projection
        emb = tower.attention_pool(z.requires_grad_(True), attn_hook=keep, final_norm=False, normalize=unit)
        return emb, z, unit

    def _layer_maps(self, tower: Tower, x: Tensor, targets: Sequence[Tensor]) -> List[Tensor]:
        """``E_l`` ``[n_chosen, B, T]`` per target ``[B, E]``, each chosen block in block order, one forward."""
        first = self.first_layer(tower)
        with torch.no_grad():
            h = tower.prefix(x, first)  # [B, T, D]
        maps: List[List[Tensor]] = [[] for _ in targets]
        pooled = self._pool_attention(tower)
        for layer in range(first, tower.n_layers):
            kept: List[Tensor] = []

            def keep(index: int, attn: Tensor) -> Tensor:
                kept.append(attn)
                return attn

            # h requires grad only to put the attention in the graph (the weights are frozen)
            emb, z, unit = self._read(tower, x, h.detach().requires_grad_(True), layer, keep)
            for i, target in enumerate(targets):
                s = cosine(emb, target) if unit else (emb * target).sum(-1)  # [B]: s_l (CoCa: a dot product)
                (grad,) = torch.autograd.grad(s.sum(), kept[0], retain_graph=i < len(targets) - 1)
                maps[i].append(self._signal(grad.clamp(min=0), z.shape[1], pooled))  # [B, T]: [LG-layer]
            h = z.detach()
        return [torch.stack(m) for m in maps]

    @staticmethod
    def _signal(grad: Tensor, rows: int, pooled: bool) -> Tensor:
        """``[B, T]`` from the positive gradient: self-attention ``[B, heads, T, T]`` → mean over heads, then
        over every query row; a MAP head's (``pooled``) ``[B, heads, queries, n]`` → mean over heads, the row of
        query 0, placed on the last ``n`` of the ``rows`` stream rows (the rows the head reads)."""
        if not pooled:
            return grad.mean(dim=(1, 2))
        row = grad.mean(dim=1)[:, 0]  # [B, n]
        return F.pad(row, (rows - row.shape[-1], 0))

    def layer_maps(self, tower: Tower, x: Tensor, target: Tensor) -> Tensor:
        """``E_l`` ``[n_chosen, B, T]`` [LG-layer] for each chosen block, in block order."""
        self._check_tower(tower)
        return self._layer_maps(tower, x, [target])[0]

    def prompt_embedding(self) -> Tensor:
        """The normalised text embedding ``[1, E]`` of :data:`CORRECTION_PROMPT` (the model's tokenizer)."""
        clip = self.clip
        if getattr(clip, "tokenizer", None) is None:
            raise ValueError(f"the LeGrad correction embeds {CORRECTION_PROMPT!r} and this model has no tokenizer: "
                             "pass correction=False")
        try:
            ids = clip.tokenize([CORRECTION_PROMPT])
        except ModelLoadError as err:  # a lazily built tokenizer that cannot be built here
            raise ValueError(f"the LeGrad correction embeds {CORRECTION_PROMPT!r}: {err}; "
                             "or pass correction=False") from err
        vocab = clip.text.token_embedding.num_embeddings
        if int(ids.max()) >= vocab or int(ids.min()) < 0:
            raise ValueError(f"the model's tokenizer gives ids outside its text vocabulary ({vocab}) for "
                             f"{CORRECTION_PROMPT!r}: pass correction=False")
        with torch.no_grad():
            return clip.text.encode(ids)

    def image_scores(self, images: Tensor, ids: Tensor, target: Tensor, generators: List[torch.Generator]) -> Scores:
        tower = self.clip.image
        self._check_tower(tower)
        if not self.corrects(tower):
            return tower.to_grid(self._layer_maps(tower, images, [target])[0].sum(0)), {}  # [LG-sum] → [B, gh, gw]
        prompt = self.prompt_embedding().to(target.dtype).expand_as(target)
        main, other = self._layer_maps(tower, images, [target, prompt])
        grid = tower.to_grid(main.sum(0))  # [B, gh, gw]
        return grid.masked_fill(minmax(tower.to_grid(other.sum(0))) > self.correction_threshold, 0), {}
