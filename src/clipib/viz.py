"""Pictures of attributions: heat overlays, tokens shaded by score (PNG via PIL, escaped HTML)."""

from __future__ import annotations

import html
import math
import json
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

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
    title: str = "", scale: int = 0, subtitle: str = "", frame: Optional[str] = None,
) -> Image.Image:
    """The input image, the heat overlay beside it, and the caption's tokens shaded by score below.

    ``subtitle``: header lines under the title (e.g. the pair's metric values, lines split at ``\\n``);
    ``frame``: a colour for the title and a border around the figure (e.g. marking a mismatched pair).
    """
    h, w = image.shape[:2]
    scale = scale or max(1, 256 // max(h, w))
    size = (w * scale, h * scale)
    left = Image.fromarray(image).resize(size, Image.NEAREST)
    right = overlay(image, heat).resize(size, Image.NEAREST) if heat is not None else left
    width = 2 * size[0] + 12
    strip = token_strip(tokens, scores if scores is not None else [0.0] * len(tokens), width)
    sub_lines = subtitle.splitlines()
    head = (24 if title else 0) + 18 * len(sub_lines) + (4 if sub_lines else 0)
    fig = Image.new("RGB", (width, head + size[1] + 8 + strip.height), "white")
    draw = ImageDraw.Draw(fig)
    if title:
        draw.text((6, 4), title, fill=frame or "black", font=_font(14))
    for k, line in enumerate(sub_lines):
        draw.text((6, (24 if title else 4) + 18 * k), line, fill="black", font=_font(13))
    fig.paste(left, (0, head))
    fig.paste(right, (size[0] + 12, head))
    fig.paste(strip, (0, head + size[1] + 8))
    if frame:
        draw.rectangle([0, 0, fig.width - 1, fig.height - 1], outline=frame, width=4)
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


def stack(figures: List[Image.Image], columns: int = 2) -> Image.Image:
    """Tile figures in a grid, ``columns`` per row."""
    w = max(f.width for f in figures)
    h = max(f.height for f in figures)
    rows = (len(figures) + columns - 1) // columns
    sheet = Image.new("RGB", (columns * w, rows * h), "white")
    for i, fig in enumerate(figures):
        sheet.paste(fig, ((i % columns) * w, (i // columns) * h))
    return sheet


def pair_records(attr: Any) -> List[Dict]:
    """One JSON-ready record per pair of an :class:`~clipib.Attribution` with inputs (typed ``Any``: viz imports
    nothing of clipib, so attribution can import it): caption, similarity, tokens and scores."""
    inp, out = attr.inputs, []
    for i, (caption, tokens) in enumerate(zip(inp.texts, inp.tokens)):
        n = len(tokens)
        out.append({
            "caption": caption, "similarity": float(inp.similarity[i]), "tokens": tokens,
            "token_scores": attr.text[i, :n].tolist() if attr.text is not None else None,
            "token_raw": attr.text_raw[i, :n].tolist() if attr.text_raw is not None else None,
            "grid_scores": attr.image_grid[i].tolist() if attr.image_grid is not None else None,
            "scalars": {k: float(v[i]) for k, v in attr.scalars.items()},
        })
    return out


def write_explanation(out_dir: Path, name: str, attr: Any) -> Dict[str, Path]:
    """``<name>.png``, ``<name>.json`` and ``<name>.html`` of an attribution with inputs (:meth:`Attribution.save`).

    JSON: ``{"method", "model", "settings", "pairs": [{"caption", "similarity", "tokens", "token_scores",
    "token_raw", "grid_scores", "scalars"}]}``. HTML: per pair the PNG figure's overlay (embedded) and the
    tokens shaded by score; captions, tokens, method and model names are escaped.
    """
    inp = attr.inputs
    out_dir.mkdir(parents=True, exist_ok=True)
    pairs = pair_records(attr)
    figures = []
    for i, pair in enumerate(pairs):
        heat = attr.image[i] if attr.image is not None else None
        title = f"{inp.method} · {inp.model} · cos {pair['similarity']:.3f}"
        figures.append(explanation_figure(to_uint8(inp.images[i], inp.normalization), heat, pair["tokens"],
                                          pair["token_scores"], title))
    paths = {"png": out_dir / f"{name}.png", "json": out_dir / f"{name}.json", "html": out_dir / f"{name}.html"}
    stack(figures, columns=1).save(paths["png"])
    paths["json"].write_text(json.dumps({"method": inp.method, "model": inp.model, "settings": inp.settings,
                                         "pairs": pairs}, indent=2))
    paths["html"].write_text(explanation_html(inp.method, inp.model, pairs, figures))
    return paths


def explanation_html(method: str, model: str, pairs: Sequence[Dict], figures: Sequence[Image.Image]) -> str:
    """A self-contained HTML page: per pair its figure (PNG, base64) and its tokens shaded by score, escaped."""
    import base64
    import io

    blocks = []
    for pair, fig in zip(pairs, figures):
        buf = io.BytesIO()
        fig.save(buf, format="PNG")
        src = base64.b64encode(buf.getvalue()).decode("ascii")
        scores = pair["token_scores"] if pair["token_scores"] is not None else [0.0] * len(pair["tokens"])
        blocks.append(f'<section><h2>{html.escape(pair["caption"])}</h2><p>cos {pair["similarity"]:.3f}</p>'
                      f'<img alt="attribution" src="data:image/png;base64,{src}"><p>'
                      f'{tokens_html(pair["tokens"], scores)}</p></section>')
    title = html.escape(f"{method} · {model}")
    return (f'<!DOCTYPE html>\n<html><head><meta charset="utf-8"><title>{title}</title></head>'
            f'<body style="font-family:sans-serif"><h1>{title}</h1>\n' + "\n".join(blocks) + "\n</body></html>\n")


# Distinct line colours for curves of several methods (Tableau 10).
_LINES = ["#4e79a7", "#f28e2b", "#e15759", "#76b7b2", "#59a14f", "#edc948", "#b07aa1", "#ff9da7", "#9c755f", "#bab0ac"]


def roc_figure(curves: Dict[str, Tuple[Sequence[float], Sequence[float], float]], title: str = "",
               size: int = 360) -> Image.Image:
    """ROC curves ``{label: (fpr, tpr, auc)}`` on one square plot, the chance diagonal dashed, a legend with AUCs."""
    pad, legend_h = 44, 18 * len(curves) + 8
    fig = Image.new("RGB", (size + 2 * pad, size + 2 * pad + legend_h), "white")
    draw = ImageDraw.Draw(fig)
    x0, y0 = pad, pad + size  # the plot's origin (fpr 0, tpr 0) in pixels

    def at(fpr: float, tpr: float) -> Tuple[float, float]:
        return x0 + fpr * size, y0 - tpr * size

    draw.rectangle([x0, pad, x0 + size, y0], outline="black")
    for i in range(0, 20, 2):  # the chance line, dashed
        draw.line([at(i / 20, i / 20), at((i + 1) / 20, (i + 1) / 20)], fill="#999999")
    for t in (0.0, 0.5, 1.0):
        draw.text((at(t, 0)[0] - 8, y0 + 4), f"{t:g}", fill="black", font=_font(12))
        draw.text((x0 - 22, at(0, t)[1] - 7), f"{t:g}", fill="black", font=_font(12))
    draw.text((x0 + size // 2 - 70, y0 + 20), "false positive rate (mismatched)", fill="black", font=_font(12))
    draw.text((4, 6), title, fill="black", font=_font(14))
    draw.text((4, 24), "true positive rate (matched)", fill="black", font=_font(12))
    for k, (label, (fpr, tpr, auc)) in enumerate(curves.items()):
        colour = _LINES[k % len(_LINES)]
        draw.line([at(float(f), float(t)) for f, t in zip(fpr, tpr)], fill=colour, width=3)
        ly = y0 + pad + 4 + 18 * k
        draw.line([(x0, ly + 7), (x0 + 24, ly + 7)], fill=colour, width=3)
        draw.text((x0 + 30, ly), f"{label}: AUROC {auc:.3f}", fill="black", font=_font(13))
    return fig


def nice_ticks(lo: float, hi: float, most: int = 6) -> List[float]:
    """Round values (1, 2 or 5 × a power of ten apart) between ``lo`` and ``hi``, at most ``most`` of them.

    >>> nice_ticks(0.0, 0.3)
    [0.0, 0.1, 0.2, 0.3]
    >>> nice_ticks(-1.0, 1.0)
    [-1.0, -0.5, 0.0, 0.5, 1.0]
    """
    if not hi > lo:
        return [lo]
    raw = (hi - lo) / max(most - 1, 1)
    power = 10 ** math.floor(math.log10(raw))
    step = next(m * power for m in (1, 2, 5, 10) if m * power >= raw * (1 - 1e-9))
    first = math.ceil(lo / step - 1e-9)
    ticks = [round(k * step, 12) for k in range(first, math.floor(hi / step + 1e-9) + 1)]
    return [t + 0.0 for t in ticks]  # no -0.0


def curve_figure(xs: Sequence[float], curves: Dict[str, Sequence[float]], title: str = "",
                 x_label: str = "", y_range: Tuple[float, float] = (-1.0, 1.0), size: Tuple[int, int] = (480, 320),
                 errors: Optional[Dict[str, Sequence[float]]] = None) -> Image.Image:
    """A line chart (PIL only): one line per ``curves`` entry over ``xs``, a legend, gridlines at round values.

    NaN points are left out of their line. ``errors`` (same keys and lengths, e.g. a std over repeats) draws a
    vertical bar of ± that value at each point. Used for the model-randomisation curves (similarity per step)
    and the ROAR removal curve.
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
    for y in nice_ticks(lo, hi):
        draw.line([point(x0, y), point(x1, y)], fill="#aaaaaa" if y == 0 else "#e4e4e4")
        draw.text((4, point(x0, y)[1] - 6), f"{y:g}", fill="black", font=font)
    for x in xs:
        draw.text((point(x, lo)[0] - 8, h - bottom + 4), f"{x:g}", fill="black", font=font)
    draw.text((left, h - 16), x_label, fill="black", font=font)
    draw.text((left, 6), title, fill="black", font=font)
    for i, (name, ys) in enumerate(curves.items()):
        colour = _LINES[i % len(_LINES)]
        pts = [point(x, y) for x, y in zip(xs, ys) if y == y]
        if len(pts) > 1:
            draw.line(pts, fill=colour, width=2)
        for px, py in pts:
            draw.ellipse([px - 2, py - 2, px + 2, py + 2], fill=colour)
        for x, y, e in zip(xs, ys, (errors or {}).get(name, ())):
            if y == y and e == e and e > 0:
                (px, p_hi), (_, p_lo) = point(x, y + e), point(x, y - e)
                draw.line([(px, p_hi), (px, p_lo)], fill=colour, width=1)
                draw.line([(px - 3, p_hi), (px + 3, p_hi)], fill=colour)
                draw.line([(px - 3, p_lo), (px + 3, p_lo)], fill=colour)
        draw.text((w - right - 110, top + 4 + 14 * i), name, fill=colour, font=font)
    return fig
