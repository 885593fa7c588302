"""The convenience layer: explain pictures and sentences in one call (``clipib.explain``).

:meth:`clipib.Attributor.attribute` takes preprocessed tensors; :func:`explain` takes what a user has — image
paths, PIL images, uint8 arrays or tensors, and strings — preprocesses and tokenizes them with the model's own
transforms, runs a method and returns its :class:`~clipib.attribution.base.Attribution` with the inputs it
used attached (``attr.inputs``), so ``attr.save(dir)`` writes the PNG, JSON and HTML views.
"""

from __future__ import annotations

import inspect
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Union

import numpy as np
import torch
from PIL import Image
from torch import Tensor

import clipib.untrusted as untrusted

from clipib.attribution import METHODS, Attribution, Attributor, Inputs
from clipib.models.loading import DEFAULT, load_clip
from clipib.models.split import SplitCLIP

ImageLike = Union[str, Path, Image.Image, np.ndarray, Tensor]
"""One image: a file path, a PIL image, a uint8 array ``[H, W, 3]`` or a tensor (uint8 ``[3, H, W]`` pixels, or
a float ``[3, H, W]`` already preprocessed for the model)."""


class InputError(ValueError):
    """Bad user input, reported as one line."""


def read_image(path: Union[str, Path]) -> Image.Image:
    """Open an image file as 8-bit RGB within bounds (:func:`clipib.untrusted.decode_image`: first frame, EXIF
    orientation, 16-bit rescaled, alpha over white, size and aspect bounded); anything it refuses — an empty,
    truncated, oversized or undecodable file — is an :class:`InputError` of one line naming the reason."""
    p = Path(path)
    if not p.is_file():
        raise InputError(f"image not found: {untrusted.printable(str(path))}")
    try:
        return untrusted.decode_image(p)
    except untrusted.Rejected as err:
        raise InputError(f"cannot use {untrusted.printable(str(path))} as an image: {err}") from None
    except OSError as err:  # unreadable file (permissions, I/O error)
        raise InputError(f"cannot read {untrusted.printable(str(path))}: {err.strerror or type(err).__name__}") from None


def clean_captions(texts: Sequence[str]) -> List[str]:
    """Captions as :func:`clipib.untrusted.clean_caption` leaves them (control characters as spaces, whitespace
    collapsed); an empty one, or one that is not valid Unicode, is an :class:`InputError`."""
    out = []
    for text in texts:
        try:
            caption = untrusted.clean_caption(text)[0]
        except untrusted.Rejected as err:
            raise InputError(f"a caption is not valid text: {err}") from None
        if not caption:
            raise InputError("a caption is empty (nothing but whitespace or control characters)")
        out.append(caption)
    return out


def method_settings(method: Attributor) -> Dict[str, Any]:
    """The method's constructor settings as they stand on the object (for records and JSON)."""
    out: Dict[str, Any] = {}
    for name in list(inspect.signature(type(method).__init__).parameters)[2:]:
        for holder in (method, getattr(method, "bottleneck", None)):
            value = getattr(holder, name, None) if holder is not None else None
            if value is not None or (holder is method and hasattr(method, name)):
                out[name] = value if isinstance(value, (int, float, str, bool, type(None))) else repr(value)
                break
    return out


def prepare_image(image: ImageLike, clip: SplitCLIP) -> Tensor:
    """One image as the model takes it, ``[3, H, W]`` in the model's dtype (see :data:`ImageLike`)."""
    if isinstance(image, (str, Path)):
        image = read_image(image)
    if isinstance(image, np.ndarray):
        if image.dtype != np.uint8 or image.ndim not in (2, 3):
            raise InputError(f"an array image must be uint8 [H, W, 3] or [H, W], got {image.dtype} {list(image.shape)}")
        image = Image.fromarray(image)
    if isinstance(image, Tensor) and image.dtype == torch.uint8:
        if image.ndim != 3 or image.shape[0] != 3:
            raise InputError(f"a uint8 image tensor must be [3, H, W] pixels, got {list(image.shape)}")
        image = Image.fromarray(image.permute(1, 2, 0).cpu().numpy())
    if isinstance(image, Image.Image):
        try:
            image = untrusted.crop_aspect(untrusted.to_rgb(image))  # as read_image leaves a file
        except untrusted.Rejected as err:
            raise InputError(f"cannot use this image: {err}") from None
        return clip.preprocess(image).to(clip.device, clip.dtype)  # [3, H, W]
    if isinstance(image, Tensor) and image.is_floating_point():
        if tuple(image.shape) != (3, *clip.image_size):
            raise InputError(f"a float image tensor is taken as preprocessed and must be [3, {clip.image_size[0]}, "
                             f"{clip.image_size[1]}], got {list(image.shape)} (pass a PIL image or a path instead)")
        return image.to(clip.device, clip.dtype)
    raise TypeError(f"an image must be a path, a PIL image, a uint8 array or a tensor, got {type(image).__name__}")


def _as_list(x: Any, what: str) -> List[Any]:
    if isinstance(x, (str, Path, Image.Image, np.ndarray)) or (isinstance(x, Tensor) and x.ndim <= 3):
        return [x]
    if isinstance(x, Tensor):  # a batch [B, 3, H, W]
        return list(x)
    if isinstance(x, (list, tuple)):
        if not x:
            raise InputError(f"no {what} given")
        return list(x)
    raise TypeError(f"{what} must be one item or a list, got {type(x).__name__}")


def explain(
    model_or_clip: Union[str, SplitCLIP],
    images: Union[ImageLike, Sequence[ImageLike]],
    texts: Union[str, Sequence[str]],
    method: Union[str, Attributor] = "m2ib",
    modality: str = "both",
    seeds: Optional[Sequence[int]] = None,
    pretrained: Optional[str] = DEFAULT,
    **settings: Any,
) -> Attribution:
    """Explain image-text pairs from paths, PIL images or tensors and strings.

    Args:
        model_or_clip: a loaded :class:`~clipib.SplitCLIP`, or a model name for :func:`clipib.load_clip`
            (loaded with ``pretrained``).
        images: one image or a list (:data:`ImageLike`); one image is paired with every text.
        texts: one caption or a list; one caption is paired with every image.
        method: a registered method name (:data:`clipib.METHODS`) built with ``**settings``, or a method object.
        modality: ``"both"``, ``"image"`` or ``"text"``; cut to what the method can do.
        seeds: one seed per pair (default: the method's seed for every pair, see :meth:`Attributor.attribute`).

    Returns:
        The :class:`~clipib.attribution.base.Attribution`, with ``attr.inputs`` holding the preprocessed images,
        the token ids, the captions and tokens, the similarities and the method's settings
        (``attr.save(dir)`` writes ``explanation.png`` / ``.json`` / ``.html``).

    >>> from clipib.models.loading import PACKAGE_DIR
    >>> sample = PACKAGE_DIR / "assets" / "sample.png"  # a red circle and a blue square
    >>> attr = explain("clipib-shapes", sample, "a red circle", method="grad_cam")
    >>> attr.image.shape, attr.inputs.tokens[0][1:4]
    (torch.Size([1, 64, 64]), ['a', 'red', 'circle'])
    """
    clip = load_clip(model_or_clip, pretrained=pretrained) if isinstance(model_or_clip, str) else model_or_clip
    if not isinstance(clip, SplitCLIP):
        raise TypeError(f"model_or_clip must be a model name or a SplitCLIP, got {type(clip).__name__}")
    if isinstance(method, str):
        if method not in METHODS:
            raise InputError(f"unknown method {method!r}; available: {', '.join(sorted(METHODS))}")
        method = METHODS[method](clip, **settings)
    elif settings:
        raise InputError("settings go to the method's constructor: pass a method name, not a method object")
    pixels = [prepare_image(im, clip) for im in _as_list(images, "images")]
    captions = _as_list(texts, "texts")
    if not all(isinstance(t, str) for t in captions):
        raise TypeError(f"texts must be strings, got {sorted({type(t).__name__ for t in captions})}")
    captions = clean_captions(captions)
    if len(pixels) != len(captions) and 1 not in (len(pixels), len(captions)):
        raise InputError(f"{len(pixels)} images and {len(captions)} texts: give as many of each, or one of either")
    n = max(len(pixels), len(captions))
    pixels, captions = pixels * (n // len(pixels)), captions * (n // len(captions))
    x = torch.stack(pixels)  # [B, 3, H, W]
    ids = clip.tokenize(captions)  # [B, ctx]
    mod = method.modality_for(modality)
    if mod is None:
        raise InputError(f"{method.name} cannot attribute {modality}")
    attr = method.attribute(x, ids, modality=mod, seeds=seeds)
    with torch.no_grad():
        sim = clip.similarity(x, ids).float().cpu()  # [B]
    attr.inputs = Inputs(images=x, ids=ids, texts=captions, tokens=[clip.token_strings(row) for row in ids],
                         normalization=clip.normalization, similarity=sim, method=method.name, model=clip.name,
                         settings=method_settings(method))
    return attr
