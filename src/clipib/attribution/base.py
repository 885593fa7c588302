"""The attribution result, the method interface and the method registry.

Every method is an :class:`Attributor`: built from a :class:`~clipib.models.split.SplitCLIP` alone with its
paper's defaults, called as ``method.attribute(images, ids, modality, seeds)``, returning an
:class:`Attribution`. Subclasses implement :meth:`Attributor.image_scores` and/or
:meth:`Attributor.text_scores`, each returning ``(raw scores in method units, scalars)``; this class does the
rest (targets, per-sample noise streams) and :func:`to_maps` turns raw scores into maps (normalisation,
resizing, masking outside SOT..EOT) — public, so reference loops and other callers build identical maps.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Dict, List, Literal, Mapping, Optional, Sequence, Tuple, Type, Union

import torch
import torch.nn.functional as F
from torch import Tensor

from clipib.attribution.common import unit_rows
from clipib.attribution.precision import precision_context
from clipib.models.passes import PassCache, active_cache
from clipib.models.split import SplitCLIP, Tower

Modality = Literal["image", "text", "both"]
Scalars = Dict[str, Tensor]
"""Per-pair diagnostics ``name -> [B]`` a method returns beside its scores (e.g. a bottleneck's final loss terms)."""
Scores = Tuple[Tensor, Scalars]
"""What :meth:`Attributor.image_scores` / :meth:`Attributor.text_scores` return: raw scores and scalars."""


@dataclass
class Attribution:
    """Attribution maps of a batch of image-text pairs.

    Maps of a pair with no defined score (a zero-norm clean embedding) or with non-finite raw scores are NaN.

    Attributes:
        image: ``[B, H, W]`` in [0, 1] at input resolution (min-max per sample), or None.
        image_grid: ``[B, gh, gw]`` raw scores on the patch grid, method units, sign kept, or None.
        text: ``[B, ctx]`` in [0, 1] (min-max over SOT..EOT per sample), 0 outside SOT..EOT, or None.
        text_raw: ``[B, ctx]`` raw scores, 0 outside SOT..EOT, or None.
        scalars: per-pair diagnostics ``name -> [B]`` (e.g. a bottleneck's final loss terms).
        inputs: what was explained (set by :func:`clipib.explain`), needed by :meth:`save`; None otherwise.
    """

    image: Optional[Tensor] = None
    image_grid: Optional[Tensor] = None
    text: Optional[Tensor] = None
    text_raw: Optional[Tensor] = None
    scalars: Dict[str, Tensor] = field(default_factory=dict)
    inputs: Optional["Inputs"] = None

    def save(self, out_dir: Union[str, Path], name: str = "explanation") -> Dict[str, Path]:
        """Write ``<name>.png`` (image, overlay, shaded tokens per pair), ``<name>.json`` (tokens, scores, raw
        grid scores, settings) and ``<name>.html`` (the same view, every caption and token HTML-escaped).

        Returns ``{"png", "json", "html"}`` paths. Raises ValueError without :attr:`inputs` (build the result
        with :func:`clipib.explain`, or set ``attr.inputs = Inputs(...)``).
        """
        if self.inputs is None:
            raise ValueError("Attribution.save needs the explained inputs: use clipib.explain(...), "
                             "or set attr.inputs = clipib.Inputs(...)")
        from clipib.viz import write_explanation

        return write_explanation(Path(out_dir), name, self)


@dataclass
class Inputs:
    """The pairs an :class:`Attribution` explains, as the model saw them (what :meth:`Attribution.save` draws).

    Attributes:
        images: preprocessed images ``[B, 3, H, W]``.
        ids: token ids ``[B, ctx]``.
        texts: the captions, one per pair.
        tokens: each pair's tokens from SOT to EOT, as strings.
        normalization: the preprocess's ``(mean, std)``, to show the images as the model saw them.
        similarity: each pair's cosine similarity ``[B]``.
        method: registry name of the method; model: the model's name; settings: the method's settings.
    """

    images: Tensor
    ids: Tensor
    texts: List[str]
    tokens: List[List[str]]
    normalization: Tuple[Sequence[float], Sequence[float]]
    similarity: Tensor
    method: str = ""
    model: str = ""
    settings: Dict[str, Any] = field(default_factory=dict)


def minmax(x: Tensor, valid: Optional[Tensor] = None) -> Tensor:
    """Min-max normalise each row of ``x`` ``[B, ...]`` to [0, 1] over ``valid`` entries (0 elsewhere).

    A constant row maps to 0 (metrics read it as undefined: docs/metrics.md). A row with a NaN or inf among
    its valid entries maps to NaN entirely: undefined, never a plausible-looking map.
    """
    flat = x.flatten(1)
    ok = torch.ones_like(flat, dtype=torch.bool) if valid is None else valid.flatten(1)
    broken = (~torch.isfinite(flat) & ok).any(1, keepdim=True)  # [B, 1]
    flat = flat.masked_fill(broken, 0)
    lo = flat.masked_fill(~ok, math.inf).amin(1, keepdim=True)
    hi = flat.masked_fill(~ok, -math.inf).amax(1, keepdim=True)
    span = hi - lo
    out = torch.where(span > 0, (flat - lo) / span.clamp_min(torch.finfo(x.dtype).tiny), torch.zeros_like(flat))
    return out.masked_fill(~ok, 0).masked_fill(broken, math.nan).view_as(x)


def scaled_layer(paper_layer: int, paper_depth: int, n_layers: int) -> int:
    """A paper's layer index on a ``paper_depth``-block tower mapped to a tower of ``n_layers`` blocks.

    Proportional, rounded half up, kept in ``1..n_layers − 1`` so at least one block follows (both papers
    leave blocks after theirs). ``scaled_layer(10, 12, 12) == 10``; ``scaled_layer(10, 12, 6) == 5``.
    """
    return max(1, min(n_layers - 1, math.floor(paper_layer * n_layers / paper_depth + 0.5)))


def sample_generators(seeds: Sequence[int]) -> List[torch.Generator]:
    """One CPU generator per pair, seeded like ``torch.manual_seed(seed)`` seeds the default generator."""
    return [torch.Generator().manual_seed(int(s)) for s in seeds]


class Attributor:
    """Interface of every attribution method.

    Subclasses set :attr:`name` and :attr:`modalities`, implement :meth:`image_scores` / :meth:`text_scores`,
    and are listed in :data:`clipib.attribution.METHODS` (one line there).
    """

    name: ClassVar[str] = ""
    """The method's registry name (``METHODS[name] is cls``)."""
    modalities: ClassVar[tuple] = ("image", "text")
    PAPER_LAYER: ClassVar[Optional[int]] = None
    """The layer the method's paper uses on a ``PAPER_DEPTH``-block tower (layered methods only)."""
    PAPER_DEPTH: ClassVar[int] = 12
    NEEDS_BATCH: ClassVar[bool] = False
    """True for a method that reads more of the eval batch than images and ids (:meth:`attribute_batch` only)."""
    precision: str = "fp32"
    """Precision of the attribution passes (:mod:`clipib.attribution.precision`); subclasses may expose it."""

    def __new__(cls, *args: object, **kwargs: object) -> "Attributor":
        """Record the constructor's settings (every argument but the model) for :meth:`rebuild`."""
        obj = super().__new__(cls)
        obj._settings = (args[1:], {k: v for k, v in kwargs.items() if k != "clip"})
        return obj

    def __init__(self, clip: SplitCLIP, seed: int = 0, layer: Optional[int] = None) -> None:
        self.clip = clip
        self.seed = seed
        self.layer = layer

    def rebuild(self, clip: SplitCLIP) -> "Attributor":
        """The same method with the same constructor settings, built on another model ``clip``.

        Metrics that re-run a method on a changed model (the model-randomisation check) use it; the method
        built here shares no state with ``self``.

        >>> class Toy(Attributor): pass
        >>> a = Toy("model A", seed=3)
        >>> b = a.rebuild("model B")
        >>> (type(b) is Toy, b.clip, b.seed)
        (True, 'model B', 3)
        """
        args, kwargs = getattr(self, "_settings", ((), {}))
        return type(self)(clip, *args, **kwargs)

    @classmethod
    def modality_for(cls, wanted: Modality = "both") -> Optional[Modality]:
        """The ``modality`` argument that runs what this method can do of ``wanted`` (None: nothing).

        >>> class ImageOnly(Attributor): modalities = ("image",)
        >>> ImageOnly.modality_for("both"), ImageOnly.modality_for("text")
        ('image', None)
        """
        want = ("image", "text") if wanted == "both" else (wanted,)
        can = [m for m in want if m in cls.modalities]
        return None if not can else "both" if len(can) == 2 else can[0]

    def layer_for(self, tower: Tower) -> int:
        """The layer the method acts on in ``tower``: ``self.layer``, or the paper's depth scaled to the tower."""
        if self.layer is None:
            if self.PAPER_LAYER is None:
                raise ValueError(f"{type(self).__name__} needs an explicit layer")
            return scaled_layer(self.PAPER_LAYER, self.PAPER_DEPTH, tower.n_layers)
        if not 0 <= self.layer <= tower.n_layers:
            raise ValueError(f"layer={self.layer} outside 0..{tower.n_layers}")
        return self.layer

    # --- to implement ----------------------------------------------------------------------------------
    def image_scores(self, images: Tensor, ids: Tensor, target: Tensor, generators: List[torch.Generator]) -> Scores:
        """Raw image scores ``[B, gh, gw]`` (patch grid) or ``[B, H, W]`` (pixels), and per-pair scalars.

        ``target`` ``[B, E]`` is the clean, normalised text embedding each image is explained against.
        Scalar names start with ``image_``.
        """
        raise NotImplementedError(f"{type(self).__name__} does not attribute images")

    def text_scores(self, images: Tensor, ids: Tensor, target: Tensor, generators: List[torch.Generator]) -> Scores:
        """Raw token scores ``[B, L]`` for ``L <= ctx`` positions (only SOT..EOT are read), and per-pair scalars.

        ``target`` ``[B, E]`` is the clean, normalised image embedding each text is explained against.
        Scalar names start with ``text_``.
        """
        raise NotImplementedError(f"{type(self).__name__} does not attribute text")

    # --- shared machinery ------------------------------------------------------------------------------
    def _check(self, images: Tensor, ids: Tensor, modality: str, seeds: Optional[Sequence[int]]) -> List[int]:
        """Validate the call (one-line TypeError / ValueError naming what was passed); return per-pair seeds."""
        if modality not in ("image", "text", "both"):
            raise ValueError(f"modality must be 'image', 'text' or 'both', got {modality!r}")
        check_inputs(images, ids, self.clip)
        wanted = ("image", "text") if modality == "both" else (modality,)
        for m in wanted:
            if m not in self.modalities:
                raise ValueError(f"{self.name or type(self).__name__} does not attribute {m}")
        if seeds is None:
            return [self.seed] * images.shape[0]
        if isinstance(seeds, (str, bytes)) or not hasattr(seeds, "__len__"):
            raise TypeError(f"seeds must be a sequence of ints, one per pair, got {type(seeds).__name__}")
        if len(seeds) != images.shape[0]:
            raise ValueError(f"got {len(seeds)} seeds for {images.shape[0]} pairs")
        if not all(isinstance(s, int) or (isinstance(s, Tensor) and not s.is_floating_point()) for s in seeds):
            raise TypeError(f"seeds must be ints, got {[type(s).__name__ for s in seeds][:4]}")
        return [int(s) for s in seeds]

    def attribute(
        self, images: Tensor, ids: Tensor, modality: Modality = "both", seeds: Optional[Sequence[int]] = None
    ) -> Attribution:
        """Attribute a batch of pairs. Each pair's result equals a call on that pair alone.

        Args:
            images: preprocessed images ``[B, 3, H, W]``.
            ids: token ids ``[B, ctx]``.
            modality: ``"image"``, ``"text"`` or ``"both"`` (image first, then text, one noise stream per pair).
            seeds: one seed per pair for the random methods. Default (None): every pair gets ``self.seed``, so
                every pair of the batch sees the *same* noise stream — a pair's map does not depend on its batch,
                but repeating a call measures one fixed draw. Pass distinct seeds (``seeds=[0, 1, 2, ...]``) to
                average over draws; eval derives them from sample keys.

        Raises:
            TypeError: images / ids that are not tensors (a PIL image, a list of captions), or of the wrong
                dtype (images must be the model's float dtype, ids integers). Use :func:`clipib.explain` for
                paths, PIL images and strings.
            ValueError: wrong shapes or sizes, a different device than the model, a modality the method lacks.
        """
        gens = sample_generators(self._check(images, ids, modality, seeds))
        with self.pass_cache():
            with torch.no_grad():
                e_img = self.clip.image.encode(images)  # [B, E]
                e_txt = self.clip.text.encode(ids)  # [B, E]
            image = text = None
            scalars: Scalars = {}
            if modality in ("image", "both"):
                with torch.enable_grad(), precision_context(self.precision, images.device):
                    image, extra = self.image_scores(images, ids, e_txt, gens)
                scalars.update(extra)
            if modality in ("text", "both"):
                with torch.enable_grad(), precision_context(self.precision, images.device):
                    text, extra = self.text_scores(images, ids, e_img, gens)
                scalars.update(extra)
        return undefined_pairs(to_maps(self.clip, ids, image=image, text=text, scalars=scalars), e_img, e_txt)

    def pass_cache(self) -> Union[PassCache, "contextlib.nullcontext[None]"]:
        """The :class:`~clipib.models.passes.PassCache` of one ``attribute`` call, or nothing when one is active
        (an eval batch's): the clean encode of each tower then also yields this method's prefix (identical
        results, one pass less; ``tests/test_shared_passes.py``)."""
        if active_cache() is not None:
            return contextlib.nullcontext()
        layers = {}
        for tower in (self.clip.image, self.clip.text):
            try:
                layers[tower] = {self.layer_for(tower)}
            except (ValueError, TypeError):  # a method without a layer
                continue
        return PassCache(layers)

    def attribute_batch(
        self, batch: Mapping[str, Any], modality: Modality = "both", seeds: Optional[Sequence[int]] = None
    ) -> Attribution:
        """Attribute an eval batch (``image [B, 3, H, W]``, ``ids [B, ctx]`` and whatever else it carries).

        What the eval loop calls. The default is ``self.attribute(batch["image"], batch["ids"], modality, seeds)``;
        a method that needs more of the batch (the ground-truth :class:`~clipib.attribution.baselines.Oracle`)
        overrides it.
        """
        return self.attribute(batch["image"], batch["ids"], modality, seeds)


def undefined_pairs(attr: Attribution, e_img: Tensor, e_txt: Tensor) -> Attribution:
    """``attr`` with every map of a pair whose clean image or text embedding is zero or not finite set to NaN.

    Such a pair has no defined cosine, so nothing can be attributed to it: its maps are NaN (metrics count it as
    skipped) rather than the constant map a zero target would silently give.
    """
    bad = ~(unit_rows(e_img) & unit_rows(e_txt))  # [B]
    if bad.any():
        for name in ("image", "image_grid", "text", "text_raw"):
            t = getattr(attr, name)
            if t is not None:
                setattr(attr, name, t.masked_fill(bad.to(t.device).view(-1, *([1] * (t.ndim - 1))), math.nan))
    return attr


def check_inputs(images: Any, ids: Any, clip: SplitCLIP) -> None:
    """Raise a one-line TypeError / ValueError unless ``images`` ``[B, 3, H, W]`` and ``ids`` ``[B, ctx]`` are
    what ``clip`` takes (tensors, the model's float dtype and integer ids, its input size and context, its device).
    """
    if not isinstance(images, Tensor):
        raise TypeError(f"images must be a preprocessed Tensor [B, 3, H, W], got {type(images).__name__} "
                        "(use clip.preprocess, or clipib.explain for paths and PIL images)")
    if not isinstance(ids, Tensor):
        raise TypeError(f"ids must be token ids, a LongTensor [B, ctx], got {type(ids).__name__} "
                        "(use clip.tokenize(captions), or clipib.explain for strings)")
    if images.dtype != clip.dtype:
        raise TypeError(f"images are {images.dtype}, the model takes {clip.dtype} (use images.to({clip.dtype}))")
    if ids.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"ids are {ids.dtype}, expected integer token ids (torch.int64, from clip.tokenize)")
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"images must be [B, 3, H, W], got {list(images.shape)}"
                         + (" (one image: use images[None])" if images.ndim == 3 else ""))
    if ids.ndim != 2 or images.shape[0] != ids.shape[0] or images.shape[0] == 0:
        raise ValueError(f"expected images [B, 3, H, W] and ids [B, ctx] with equal B > 0, got "
                         f"{list(images.shape)} and {list(ids.shape)}")
    if tuple(images.shape[-2:]) != clip.image_size:
        raise ValueError(f"images are {tuple(images.shape[-2:])}, the model takes {clip.image_size} "
                         "(use clip.preprocess)")
    if ids.shape[1] > clip.context_length:
        raise ValueError(f"ids have {ids.shape[1]} positions, the model's context is {clip.context_length}")
    for what, t in (("images", images), ("ids", ids)):
        if t.device != clip.device:
            raise ValueError(f"{what} are on {t.device}, the model on {clip.device} (use .to(clip.device))")
    finite = torch.isfinite(images.detach()).flatten(1).all(1)  # [B]
    if not finite.all():
        raise ValueError(f"images contain NaN or inf (pairs {(~finite).nonzero().flatten().tolist()[:8]}): "
                         "refusing to explain them")


def to_maps(clip: SplitCLIP, ids: Tensor, image: Optional[Tensor] = None, text: Optional[Tensor] = None,
            scalars: Optional[Scalars] = None) -> Attribution:
    """The :class:`Attribution` of raw scores: what :meth:`Attributor.attribute` returns for them.

    Args:
        clip: the explained model (grid, input size, token spans).
        ids: token ids ``[B, ctx]``.
        image: raw image scores on the patch grid ``[B, gh, gw]`` or at pixel resolution ``[B, H, W]``.
        text: raw token scores ``[B, L]``, ``L <= ctx``.
        scalars: per-pair diagnostics, detached and kept as given.
    """
    out = Attribution(scalars={k: v.detach() for k, v in (scalars or {}).items()})
    if image is not None:
        out.image_grid, out.image = _image_maps(clip, image.detach().float())
    if text is not None:
        out.text_raw, out.text = _text_maps(clip, text.detach().float(), ids)
    return out


def _image_maps(clip: SplitCLIP, raw: Tensor) -> Tuple[Tensor, Tensor]:
    """``(image_grid, image)`` from raw scores on the grid or at pixel resolution."""
    size, grid = clip.image_size, clip.grid
    if tuple(raw.shape[-2:]) == grid:
        up = F.interpolate(raw[:, None], size=size, mode="bilinear", align_corners=False)[:, 0]
        return raw, minmax(up)
    if tuple(raw.shape[-2:]) == size:
        return F.adaptive_avg_pool2d(raw[:, None], grid)[:, 0], minmax(raw)
    raise ValueError(f"image scores of shape {tuple(raw.shape)} match neither grid {grid} nor size {size}")


def _text_maps(clip: SplitCLIP, raw: Tensor, ids: Tensor) -> Tuple[Tensor, Tensor]:
    """``(text_raw, text)`` padded to the context, 0 outside SOT..EOT."""
    full = raw.new_zeros(ids.shape)
    full[:, : raw.shape[1]] = raw[:, : ids.shape[1]]
    valid = clip.text.span_mask(ids)
    full = full.masked_fill(~valid, 0)
    return full, minmax(full, valid)
