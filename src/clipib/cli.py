"""The ``clipib`` console script (also ``python -m clipib``): ``explain`` and ``bench``.

Every failure on bad input is one line on stderr (``clipib: error: ...``) and exit code 2. The benchmark code
(:mod:`clipib.bench`) is imported only by the ``bench`` command.
"""

from __future__ import annotations

import argparse
import inspect
import json
import sys
import warnings
from pathlib import Path
from typing import Any, Dict, List, Optional

import numpy as np
from PIL import Image, UnidentifiedImageError

from clipib.attribution import METHODS, Attributor
from clipib.models.loading import DEFAULT, ModelLoadError, load_clip
from clipib.models.split import SplitCLIP, UnsupportedModelError
from clipib.viz import explanation_figure, to_uint8


class InputError(ValueError):
    """Bad user input, reported as one line."""


def read_image(path: str) -> Image.Image:
    """Open an image as 8-bit RGB: grayscale, palette, 16-bit and float images are rescaled, alpha is
    composited over white."""
    p = Path(path)
    if not p.is_file():
        raise InputError(f"image not found: {path}")
    try:
        img = Image.open(p)
        img.load()
    except (UnidentifiedImageError, OSError) as err:
        raise InputError(f"cannot read {path} as an image ({type(err).__name__})") from err
    if img.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        arr = np.asarray(img, dtype=np.float64)
        top = 65535.0 if img.mode.startswith("I;16") or arr.max() > 255 else 255.0
        img = Image.fromarray((arr.clip(0, top) / top * 255).round().astype(np.uint8))
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        img = img.convert("RGBA")
        white = Image.new("RGBA", img.size, (255, 255, 255, 255))
        img = Image.alpha_composite(white, img)
    return img.convert("RGB")


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


def explain(
    clip: SplitCLIP, image: Image.Image, text: str, method_name: str, out_dir: Path, settings: Optional[dict] = None
) -> Dict[str, Any]:
    """Explain one pair with ``method_name``; write ``explanation.png`` and ``explanation.json`` to ``out_dir``."""
    if not text.strip():
        raise InputError("the caption is empty")
    method = METHODS[method_name](clip, **(settings or {}))
    x = clip.preprocess(image)[None].to(clip.device)  # [1, 3, H, W]
    ids = clip.tokenize([text])  # [1, ctx]
    modality = method.modality_for("both")
    attr = method.attribute(x, ids, modality=modality)
    tokens = clip.token_strings(ids[0])
    n = len(tokens)
    text_scores = attr.text[0, :n].tolist() if attr.text is not None else None
    record = {
        "method": method_name, "model": clip.name, "settings": method_settings(method), "caption": text,
        "similarity": float(clip.similarity(x, ids)[0]), "tokens": tokens,
        "token_scores": text_scores,
        "token_raw": attr.text_raw[0, :n].tolist() if attr.text_raw is not None else None,
        "grid_scores": attr.image_grid[0].tolist() if attr.image_grid is not None else None,
        "scalars": {k: float(v[0]) for k, v in attr.scalars.items()},
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    title = f"{method_name} · {clip.name} · cos {record['similarity']:.3f}"
    heat = attr.image[0] if attr.image is not None else None
    explanation_figure(to_uint8(x[0], clip.normalization), heat, tokens, text_scores, title).save(out_dir / "explanation.png")
    (out_dir / "explanation.json").write_text(json.dumps(record, indent=2))
    return record


def _parser(bench_options: bool = True) -> argparse.ArgumentParser:
    """The console script's parser; ``bench_options``: give ``bench`` its options (imports the benchmark)."""
    parser = argparse.ArgumentParser(prog="clipib", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    ex = sub.add_parser("explain", help="explain one image-text pair")
    ex.add_argument("--image", required=True, help="image file")
    ex.add_argument("--text", required=True, help="caption")
    ex.add_argument("--method", default="m2ib", choices=sorted(m for m, c in METHODS.items() if not c.NEEDS_BATCH),
                    help="attribution method (not those that need an eval batch, e.g. oracle)")
    ex.add_argument("--model", default="ViT-B-32-quickgelu", help="open_clip name, JSON config, or clipib-shapes")
    ex.add_argument("--pretrained", default=DEFAULT,
                    help="open_clip tag, checkpoint path, or 'none' (default: openai; clipib-shapes: shipped)")
    ex.add_argument("--out", default="outputs/explain", help="output folder")
    ex.add_argument("--device", default="cpu")
    bench = sub.add_parser("bench", help="throughput against the reference loops (clipib.bench)")
    if bench_options:
        from clipib.bench.throughput import add_arguments

        add_arguments(bench)
    return parser


def _run_explain(args: argparse.Namespace) -> None:
    image = read_image(args.image)
    if not args.text.strip():
        raise InputError("the caption is empty")
    clip = load_clip(args.model, pretrained=args.pretrained, device=args.device)
    record = explain(clip, image, args.text, args.method, Path(args.out))
    print(f"{args.method}: cos {record['similarity']:.3f}; wrote {Path(args.out) / 'explanation.png'} and .json")


def _run_bench(args: argparse.Namespace) -> None:
    from clipib.bench.throughput import run_from_args

    try:
        run_from_args(args)
    except ValueError as err:  # unknown method, bad --settings
        raise InputError(str(err).splitlines()[0]) from err


def main(argv: Optional[List[str]] = None) -> int:
    """Entry point; returns the exit code."""
    argv = sys.argv[1:] if argv is None else list(argv)
    args = _parser(bench_options=argv[:1] == ["bench"]).parse_args(argv)
    warnings.simplefilter("default")
    try:
        {"explain": _run_explain, "bench": _run_bench}[args.command](args)
    except (InputError, ModelLoadError, UnsupportedModelError) as err:
        print(f"clipib: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
