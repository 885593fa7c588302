"""Pictures of attributions: heat overlays, tokens shaded by score (PNG via PIL, escaped HTML)."""

from __future__ import annotations

import html
from typing import Dict, Optional, Sequence, Tuple

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont
from torch import Tensor

# Anchor colours of a perceptually ordered ramp (dark purple -> red -> yellow), like matplotlib's "inferno".
_RAMP = np.array([[0, 0, 4], [87, 16, 110], [188, 55, 84], [249, 142, 9], [252, 255, 164]], dtype=np.float64)


def colormap(x: np.ndarray) -> np.ndarray:
    """Map values in [0, 1] (any shape) to uint8 RGB (shape + (3,))."""
    x = np.clip(np.nan_to_num(np.asarray(x, dtype=np.float64)), 0, 1) * (len(_RAMP) - 1)
    lo = np.floor(x).astype(int).clip(0, len(_RAMP) - 2)
    frac = (x - lo)[..., None]
    return (_RAMP[lo] * (1 - frac) + _RAMP[lo + 1] * frac).round().astype(np.uint8)


def to_uint8(image: Tensor, normalization: Tuple[Sequence[float], Sequence[float]]) -> np.ndarray:
    """A preprocessed image ``[3, H, W]`` back to uint8 ``[H, W, 3]`` (what the model saw), given the preprocess's
    ``(mean, std)`` (:attr:`clipib.SplitCLIP.normalization`)."""
    mean, std = normalization
    img = image.detach().float().cpu() * torch.tensor(std)[:, None, None] + torch.tensor(mean)[:, None, None]
    return (img.clamp(0, 1).permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)


def overlay(image: np.ndarray, heat: Tensor, alpha: float = 0.55) -> Image.Image:
    """Blend ``heat`` ``[H, W]`` in [0, 1] over ``image`` uint8 ``[H, W, 3]``."""
    colours = colormap(heat.detach().float().cpu().numpy()).astype(np.float64)
    mixed = (1 - alpha) * image.astype(np.float64) + alpha * colours
    return Image.fromarray(mixed.round().astype(np.uint8))


def _font(size: int) -> ImageFont.ImageFont:
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1
        return ImageFont.load_default()


def token_strip(tokens: Sequence[str], scores: Sequence[float], width: int, size: int = 16) -> Image.Image:
    """Tokens laid out in lines of at most ``width`` pixels, each on a background shaded by its score."""
    font, pad = _font(size), 4
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    boxes, x, y, line_h = [], pad, pad, size + 2 * pad
    for tok in tokens:
        w = int(probe.textlength(tok, font=font)) + 2 * pad
        if x + w > width - pad and x > pad:
            x, y = pad, y + line_h + pad
        boxes.append((x, y, w))
        x += w + pad
    canvas = Image.new("RGB", (width, y + line_h + pad), "white")
    draw = ImageDraw.Draw(canvas)
    for tok, s, (bx, by, w) in zip(tokens, scores, boxes):
        colour = tuple(int(c) for c in colormap(np.array(float(s))))
        draw.rectangle([bx, by, bx + w, by + line_h], fill=colour)
        ink = "black" if float(s) > 0.6 else "white"
        draw.text((bx + pad, by + pad), tok, fill=ink, font=font)
    return canvas


def explanation_figure(
    image: np.ndarray, heat: Optional[Tensor], tokens: Sequence[str], scores: Optional[Sequence[float]],
    title: str = "", scale: int = 0,
) -> Image.Image:
    """The input image, the heat overlay beside it, and the caption's tokens shaded by score below."""
    h, w = image.shape[:2]
    scale = scale or max(1, 256 // max(h, w))
    size = (w * scale, h * scale)
    left = Image.fromarray(image).resize(size, Image.NEAREST)
    right = overlay(image, heat).resize(size, Image.NEAREST) if heat is not None else left
    width = 2 * size[0] + 12
    strip = token_strip(tokens, scores if scores is not None else [0.0] * len(tokens), width)
    head = 24 if title else 0
    fig = Image.new("RGB", (width, head + size[1] + 8 + strip.height), "white")
    if title:
        ImageDraw.Draw(fig).text((4, 4), title, fill="black", font=_font(14))
    fig.paste(left, (0, head))
    fig.paste(right, (size[0] + 12, head))
    fig.paste(strip, (0, head + size[1] + 8))
    return fig


def tokens_html(tokens: Sequence[str], scores: Sequence[float]) -> str:
    """Tokens as HTML spans shaded by score; token text is escaped."""
    spans = []
    for tok, s in zip(tokens, scores):
        r, g, b = (int(c) for c in colormap(np.array(float(s))))
        ink = "#000" if float(s) > 0.6 else "#fff"
        spans.append(f'<span style="background:rgb({r},{g},{b});color:{ink};padding:1px 3px" '
                     f'title="{float(s):.3f}">{html.escape(tok)}</span>')
    return " ".join(spans)


_LINE_COLOURS = ("#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b")


def curve_figure(xs: Sequence[float], curves: Dict[str, Sequence[float]], title: str = "",
                 x_label: str = "", y_range: Tuple[float, float] = (-1.0, 1.0), size: Tuple[int, int] = (480, 320)
                 ) -> Image.Image:
    """A line chart (PIL only): one line per ``curves`` entry over ``xs``, a legend, axes with end labels.

    NaN points are left out of their line. Used for the model-randomisation curves (similarity per step).
    """
    w, h = size
    left, right, top, bottom = 44, 12, 26, 36
    fig = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(fig)
    font = _font(12)
    x0, x1 = (min(xs), max(xs)) if len(xs) > 1 and max(xs) > min(xs) else (0.0, max(1.0, float(max(xs, default=1))))
    lo, hi = y_range

    def point(x: float, y: float) -> Tuple[float, float]:
        px = left + (x - x0) / (x1 - x0) * (w - left - right)
        py = top + (hi - min(max(y, lo), hi)) / (hi - lo) * (h - top - bottom)
        return px, py

    draw.rectangle([left, top, w - right, h - bottom], outline="black")
    for y in (lo, 0.0, hi) if lo < 0 < hi else (lo, hi):
        draw.line([point(x0, y), point(x1, y)], fill="#dddddd")
        draw.text((4, point(x0, y)[1] - 6), f"{y:g}", fill="black", font=font)
    for x in xs:
        draw.text((point(x, lo)[0] - 8, h - bottom + 4), f"{x:g}", fill="black", font=font)
    draw.text((left, h - 16), x_label, fill="black", font=font)
    draw.text((left, 6), title, fill="black", font=font)
    for i, (name, ys) in enumerate(curves.items()):
        colour = _LINE_COLOURS[i % len(_LINE_COLOURS)]
        pts = [point(x, y) for x, y in zip(xs, ys) if y == y]
        if len(pts) > 1:
            draw.line(pts, fill=colour, width=2)
        for px, py in pts:
            draw.ellipse([px - 2, py - 2, px + 2, py + 2], fill=colour)
        draw.text((w - right - 110, top + 4 + 14 * i), name, fill=colour, font=font)
    return fig
