"""Untrusted input, read within bounds: images, captions, shard (tar) members, sample keys and text rendered for people.

clipib reads web-scraped data (any bytes as an image, any text as a caption, any name as a sample key). This
module is the one place that decides what such input may do; the data sources (:mod:`clipib.data`) and
:func:`clipib.explain` both use it, so a picture or caption behaves the same in ``eval.py`` and in
``clipib explain``. What each function refuses raises :class:`Rejected` (a ``ValueError``) with a short
*reason name* (``"image too large"``, ...) and a one-line detail; the data sources turn it into a counted,
named skip, ``clipib explain`` into one line on stderr. ``docs/guarantees.md`` lists the promises.
"""

from __future__ import annotations

import html
import io
import os
import re
import tarfile
from typing import IO, Iterator, Optional, Tuple, Union

import numpy as np
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

MAX_PIXELS = 89_478_485
"""Largest decoded image, in pixels (PIL's own default warning threshold, ~9459 px square, ~256 MiB as RGB).
Checked on the header, before any pixel is decoded, and independent of PIL's global ``MAX_IMAGE_PIXELS``."""

MAX_ASPECT = 20
"""Images longer than ``MAX_ASPECT`` times their short side are centre-cropped to that ratio after decoding. The
usual CLIP preprocess (short side to S, centre crop S x S) then sees the same centre while the resize stays
bounded (a 1 x 100,000 px image would otherwise be resized to S x 100,000·S). A squash-resize preprocess
(SigLIP) sees the cropped image: at ratios past 20:1 a squashed square holds no recognisable content anyway."""

MAX_CAPTION_CHARS = 4096
"""Captions are cut to this many characters before tokenizing (and counted as truncated): far past any CLIP
context (77 tokens of at most a few dozen characters each), it bounds the tokenizer's work on a megabyte
caption."""

MAX_KEY_CHARS = 512
"""Longest accepted sample key."""

MAX_MEMBER_BYTES = 64 * 2**20
"""Largest shard (tar) member read into memory, by the size its header declares: 64 MiB, far past any web image
or caption clipib can use (a 9459 px square JPEG, near :data:`MAX_PIXELS`, is a few MiB), and small enough
that a hostile shard cannot make a reader hold gigabytes for one sample. Checked before the member's data is
read (:func:`tar_members`)."""

_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")  # C0 and C1 control characters
_MARKDOWN = re.compile(r"([\\`*_\[\]|~#])")  # characters that make markdown links, tables, emphasis, headings


class Rejected(ValueError):
    """Input clipib will not use: ``reason`` is a short, stable name (the skip reason), ``detail`` one line."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason} ({detail})" if detail else reason)
        self.reason, self.detail = reason, detail


# --- images ----------------------------------------------------------------------------------------------------


def decode_image(source: Union[bytes, bytearray, str, os.PathLike], max_pixels: int = MAX_PIXELS,
                 max_aspect: float = MAX_ASPECT) -> Image.Image:
    """Decode an image (bytes or a path) as 8-bit RGB, within bounds; raise :class:`Rejected` otherwise.

    * the size is read from the header and refused past ``max_pixels`` before decoding (decompression bombs);
    * the first frame of an animation (GIF, WebP, APNG) or of a multi-page file; decoding is forced with
      ``load()``, so a truncated file fails here (PIL's ``LOAD_TRUNCATED_IMAGES``, which pads with grey, is
      refused); an empty file, random bytes or an unknown format are refused;
    * the EXIF orientation is applied; 16-bit and float images are rescaled to 8 bits (not clipped); alpha,
      and palette or RGB transparency, are composited over white; CMYK, YCbCr, grey and palette become RGB;
    * aspect ratios past ``max_aspect`` are centre-cropped to it (:data:`MAX_ASPECT`).

    Reason names: ``"empty image"``, ``"image too large"``, ``"truncated image"``, ``"undecodable image"``.
    """
    if ImageFile.LOAD_TRUNCATED_IMAGES:
        raise RuntimeError("PIL.ImageFile.LOAD_TRUNCATED_IMAGES is True; clipib needs it False to refuse truncated images")
    if isinstance(source, (bytes, bytearray)):
        if not source:
            raise Rejected("empty image", "0 bytes")
        fp = io.BytesIO(source)
    else:
        if os.path.getsize(source) == 0:
            raise Rejected("empty image", "0 bytes")
        fp = open(source, "rb")
    with fp:
        try:
            img = Image.open(fp)
        except Image.DecompressionBombError as exn:
            raise Rejected("image too large", _plain(exn)) from None
        except (UnidentifiedImageError, OSError, ValueError, SyntaxError, EOFError) as exn:
            raise _decode_error(exn) from None
        with img:
            width, height = img.size
            if width < 1 or height < 1 or width * height > max_pixels:
                raise Rejected("image too large" if width * height else "undecodable image",
                               f"{width}x{height} px; the limit is {max_pixels} px")
            _load(img)
            rgb = to_rgb(_upright(img))
    return crop_aspect(rgb, max_aspect)


def _plain(exn: BaseException) -> str:
    """An exception's text on one line, without object addresses (stable across runs)."""
    text = re.sub(r"\s*<[^<>]* at 0x[0-9a-f]+>", "", str(exn))
    return " ".join(text.split())[:200]


def _load(img: Image.Image) -> None:
    """Decode the pixels (the current, i.e. first, frame); truncated or corrupt data raises :class:`Rejected`."""
    try:
        img.load()
    except Image.DecompressionBombError as exn:
        raise Rejected("image too large", _plain(exn)) from None
    except (OSError, ValueError, SyntaxError, EOFError, IndexError, TypeError) as exn:
        raise _decode_error(exn) from None


def _decode_error(exn: BaseException) -> Rejected:
    """``truncated image`` when PIL says the data ends early, else ``undecodable image``."""
    text = _plain(exn)
    reason = "truncated image" if "truncated" in text.lower() else "undecodable image"
    return Rejected(reason, f"{type(exn).__name__}: {text}")


def _upright(img: Image.Image) -> Image.Image:
    """The image turned as its EXIF orientation says; a malformed EXIF block is ignored (the pixels stand)."""
    try:
        return ImageOps.exif_transpose(img)
    except Exception:  # PIL raises many types on malformed EXIF; orientation is a nicety, the pixels are fine
        return img


def to_rgb(img: Image.Image) -> Image.Image:
    """8-bit RGB of any PIL image: 16-bit / 32-bit / float rescaled to 0..255, transparency over white."""
    try:
        if img.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
            arr = np.nan_to_num(np.asarray(img, dtype=np.float64), nan=0.0, posinf=0.0, neginf=0.0)
            top = 65535.0 if img.mode.startswith("I;16") or arr.max(initial=0) > 255 else 255.0
            img = Image.fromarray((arr.clip(0, top) / top * 255).round().astype(np.uint8))
        if "A" in img.getbands() or "a" in img.getbands() or "transparency" in img.info:
            rgba = img.convert("RGBA")
            return Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba).convert("RGB")
        return img.convert("RGB")
    except (ValueError, OSError, TypeError) as exn:  # e.g. a mode PIL cannot convert (LAB)
        raise Rejected("undecodable image", f"mode {img.mode}: {_plain(exn)}") from None


def crop_aspect(img: Image.Image, max_aspect: float = MAX_ASPECT) -> Image.Image:
    """Centre-crop the long side to ``max_aspect`` times the short side (unchanged when within it)."""
    width, height = img.size
    if width > height * max_aspect:
        keep = max(1, int(height * max_aspect))
        left = (width - keep) // 2
        return img.crop((left, 0, left + keep, height))
    if height > width * max_aspect:
        keep = max(1, int(width * max_aspect))
        top = (height - keep) // 2
        return img.crop((0, top, width, top + keep))
    return img


# --- captions --------------------------------------------------------------------------------------------------


def clean_caption(text: str, max_chars: int = MAX_CAPTION_CHARS) -> Tuple[str, bool]:
    """``(caption, cut)``: control characters become spaces, whitespace runs one space, ends stripped; cut to
    ``max_chars`` characters (``cut`` True). Right-to-left text, emoji, combining and zero-width characters
    (format characters, ZWJ emoji sequences) are kept as they are. An empty result is returned as ``""`` (the
    caller decides: a skip, or an error). Text that is not valid Unicode (lone surrogates, e.g. from
    undecodable bytes read with ``surrogateescape``) raises :class:`Rejected` ``"non-UTF-8 caption"``.
    """
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exn:
        raise Rejected("non-UTF-8 caption", f"undecodable byte at character {exn.start}") from None
    text = " ".join(_CONTROL.sub(" ", text).split())
    if len(text) > max_chars:
        return text[:max_chars].rstrip(), True
    return text, False


def decode_caption(data: Optional[bytes], max_chars: int = MAX_CAPTION_CHARS) -> Tuple[str, bool]:
    """``(caption, cut)`` from raw bytes (:func:`clean_caption`); :class:`Rejected` when missing (``"missing
    caption"``), not UTF-8 (``"non-UTF-8 caption"``) or empty after cleaning (``"empty caption"``)."""
    if data is None:
        raise Rejected("missing caption")
    try:
        text = bytes(data).decode("utf-8")
    except UnicodeDecodeError as exn:
        raise Rejected("non-UTF-8 caption", f"{exn.reason} at byte {exn.start}") from None
    caption, cut = clean_caption(text, max_chars)
    if not caption:
        raise Rejected("empty caption")
    return caption, cut


# --- archives --------------------------------------------------------------------------------------------------


def tar_members(fileobj: IO[bytes], max_bytes: int = MAX_MEMBER_BYTES) -> Iterator[Tuple[str, Union[bytes, Rejected]]]:
    """``(name, data)`` of each regular file of a tar stream (plain or compressed), in order, read sequentially and
    never extracted. A member whose header declares more than ``max_bytes`` gives a :class:`Rejected`
    ``"member too large"`` in place of its data, and its data is skipped over in fixed-size blocks (never held in
    memory). Errors of the tar format (a truncated or random-bytes file) propagate as ``tarfile`` raises them."""
    with tarfile.open(fileobj=fileobj, mode="r|*") as tar:
        for info in tar:
            if not info.isreg():
                continue
            if info.size > max_bytes:
                yield info.name, Rejected("member too large", f"{info.size} bytes; the limit is {max_bytes} bytes")
            else:
                member = tar.extractfile(info)
                yield info.name, member.read() if member is not None else b""
            tar.members = []  # a stream reader would otherwise keep every header it has seen


# --- keys and names --------------------------------------------------------------------------------------------


def key_problem(key: str) -> Optional[str]:
    """Why ``key`` is not a safe sample key (None when it is): empty, too long, a control character (NUL
    included), an absolute path (``/x``, ``\\x``, ``C:``), or a ``..`` component. clipib never builds a path
    from a key (the attribution store names members by a hash of it), and refusing such keys keeps it so for
    whatever reads the records later."""
    if not key:
        return "empty key"
    if len(key) > MAX_KEY_CHARS:
        return f"key longer than {MAX_KEY_CHARS} characters"
    if _CONTROL.search(key):
        return f"control character in key {key[:60]!r}"
    if key.startswith(("/", "\\")) or re.match(r"[A-Za-z]:", key):
        return f"absolute path as key {key[:60]!r}"
    if ".." in re.split(r"[/\\]", key):
        return f"'..' in key {key[:60]!r}"
    return None


def safe_name(name: str) -> str:
    """A file-name component made from ``name``: only letters, digits and ``.+-_`` (others become ``_``), never
    ``.``/``..`` nor empty; for names that come from configs or data (method names in output files)."""
    out = re.sub(r"[^\w.+-]", "_", name, flags=re.ASCII)[:120]
    return out if out.strip(".") else "_" + out


# --- text rendered for people ----------------------------------------------------------------------------------


def markdown_text(text: str) -> str:
    """``text`` for a markdown cell (TensorBoard's TEXT tab): HTML-escaped, markdown syntax backslash-escaped
    (no link, table break, emphasis or heading can be injected), control characters and newlines as spaces."""
    return _MARKDOWN.sub(r"\\\1", html.escape(" ".join(_CONTROL.sub(" ", text).split()), quote=True))


def printable(text: str, limit: int = 200) -> str:
    """``text`` for a picture or a one-line message: control characters as spaces, at most ``limit`` characters."""
    text = " ".join(_CONTROL.sub(" ", text).split())
    return text if len(text) <= limit else text[: limit - 1] + "…"
