"""The ``clipib`` console script (also ``python -m clipib``): ``explain``, ``bench`` and ``roar``.

Every failure on bad input is one line on stderr (``clipib: error: ...``) and exit code 2. The benchmark code
(:mod:`clipib.bench`) is imported only by the ``bench`` command, the ROAR sweep (:mod:`clipib.roar.sweep`) only by ``roar``.
"""

from __future__ import annotations

import argparse
import sys
import warnings
from pathlib import Path
from typing import Any, Dict, List, Optional

from PIL import Image

from clipib.api import InputError, clean_captions, explain as api_explain, method_settings, read_image
from clipib.attribution import METHODS
from clipib.models.loading import DEFAULT, ModelLoadError, load_clip
from clipib.models.split import SplitCLIP, UnsupportedModelError
from clipib.viz import pair_records

__all__ = ["InputError", "explain", "main", "method_settings", "read_image"]


def explain(
    clip: SplitCLIP, image: Image.Image, text: str, method_name: str, out_dir: Path, settings: Optional[dict] = None
) -> Dict[str, Any]:
    """Explain one pair with ``method_name``; write ``explanation.png`` / ``.json`` / ``.html`` to ``out_dir``
    (:meth:`clipib.Attribution.save`); return the pair's record."""
    attr = api_explain(clip, image, text, method=method_name, **(settings or {}))
    attr.save(out_dir)
    return pair_records(attr)[0]


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
    roar = sub.add_parser("roar", help="run / resume a ROAR grid: ROAR+ repeats or the removal curve (docs/roar.md)")
    roar.add_argument("-c", "--config", action="append", required=True, help="train.py config(s) of one run")
    roar.add_argument("--out", required=True, help="sweep folder (resumed when it exists)")
    roar.add_argument("--methods", nargs="+", default=["oracle", "random", "m2ib"], help="methods with stored maps")
    roar.add_argument("--fractions", nargs="*", type=float, default=None,
                      help="removal fractions (e.g. 0.1 ... 0.9 for the curve); default: the modality's (ROAR+)")
    roar.add_argument("--curve", action="store_true", help="the removal curve: fractions 0.1 ... 0.9")
    roar.add_argument("--repeats", type=int, default=5, help="runs per point, seeds seed .. seed+repeats-1")
    roar.add_argument("--seed", type=int, default=0)
    roar.add_argument("--maps", default=None, help="eval run holding the maps (default OUT/maps)")
    roar.add_argument("--maps-config", default=None, help="eval config that makes the maps first when missing")
    roar.add_argument("overrides", nargs="*", help="train.py overrides for every run, after --, e.g. -- --trainer.max_epochs 1")
    return parser


def _run_roar(args: argparse.Namespace) -> None:
    from clipib.roar.sweep import CURVE_FRACTIONS, SweepError, run_sweep, sweep_rank

    for c in args.config + ([args.maps_config] if args.maps_config else []):
        if not Path(c).is_file():
            raise InputError(f"config {c} does not exist")
    if args.curve and args.fractions:
        raise InputError("give --curve or --fractions, not both")
    fractions = list(CURVE_FRACTIONS) if args.curve else (args.fractions or [None])
    if any(f is not None and not 0.0 < f < 1.0 for f in fractions):
        raise InputError(f"fractions must lie in (0, 1), got {fractions}")
    maps = Path(args.maps) if args.maps else Path(args.out) / "maps"
    if args.maps_config is None and not any((maps / "attributions").glob("rank*-*.tar")):
        raise InputError(f"{maps} holds no stored maps (attributions/rank*-*.tar): give --maps-config <eval config> "
                         "to make them there, or --maps <an eval run with records.store_maps true>")
    try:
        run_sweep(args.config, Path(args.out), args.methods, fractions, args.repeats, args.seed,
                  Path(args.maps) if args.maps else None, args.maps_config, args.overrides)
    except SweepError as err:  # e.g. maps missing in a multi-process sweep
        raise InputError(str(err)) from err
    if sweep_rank() == 0:  # the other processes of a multi-process sweep print nothing
        print((Path(args.out) / "summary.md").read_text())


def _run_explain(args: argparse.Namespace) -> None:
    image = read_image(args.image)
    clean_captions([args.text])  # an empty caption fails before the model loads
    clip = load_clip(args.model, pretrained=args.pretrained, device=args.device)
    record = explain(clip, image, args.text, args.method, Path(args.out))
    print(f"{args.method}: cos {record['similarity']:.3f}; wrote {Path(args.out) / 'explanation.png'}, .json and .html")


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
        {"explain": _run_explain, "bench": _run_bench, "roar": _run_roar}[args.command](args)
    except (InputError, ModelLoadError, UnsupportedModelError) as err:
        print(f"clipib: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
