"""Throughput of the attribution methods, measured against the reference-shaped loops (issue 7).

For every method and batch size: pairs/s and peak memory of one ``method.attribute`` call on synthetic pairs
(both modalities where the method has both). For the methods of
:data:`~clipib.bench.reference_loops.REFERENCE_LOOPS` (M2IB, NIB) the same run times their reference-shaped loop
(one pair at a time, the model's weights requiring gradients, as the official code runs), and reports
clipib's speed-up and the agreement of the maps: a stochastic loop (M2IB) by Spearman ρ next to the
reference's own seed-to-seed ρ, a deterministic one (NIB) by the max abs difference of the normalised maps.
:mod:`clipib.bench.flops` adds the FLOP floor. Used by ``clipib bench`` and ``benchmarks/throughput.py``.

Variants: a ``--settings`` entry may name its registered method (``{"m2ib_compiled": {"method": "m2ib",
"compile": true}}``, then ``--methods m2ib m2ib_compiled``), as eval configs do; a variant gets the speed-up
over its registered method's reference loop when that ran. A ``compile=True`` variant is warmed up at each
batch size (untimed: ``compile_s``) and its rows carry ``compile_graphs`` (graphs compiled while warming up)
and ``recompiles_timed`` (graphs compiled during the timed call: 0 when one compilation serves the run).
"""

from __future__ import annotations

import sys
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch
from torch import Tensor
from tqdm.auto import tqdm

from clipib.attribution import METHODS, Attribution, Attributor, to_maps
from clipib.attribution.compiled import compile_counts
from clipib.bench.common import load_average, machine_info, synthetic_pairs
from clipib.bench.flops import flop_report
from clipib.bench.reference_loops import REFERENCE_LOOPS, ReferenceLoop, loop_weights
from clipib.bench.timing import measure, seconds, spearman
from clipib.models.split import SplitCLIP


def _skipped_row(name: str, kwargs: Optional[dict], b: int, modality: str, estimate_s: float,
                 max_seconds: float) -> Dict[str, Any]:
    return {"method": name, "settings": kwargs or {}, "batch_size": b, "modality": modality,
            "skipped": f"estimated {estimate_s:.0f} s > budget {max_seconds:.0f} s", "estimated_s": estimate_s}


def resolve(name: str, kwargs: Optional[dict] = None) -> Tuple[str, Dict[str, Any]]:
    """``(registered method, constructor settings)`` of a benchmark entry: ``kwargs["method"]`` names the
    registered method of a variant (default: ``name`` itself)."""
    settings = dict(kwargs or {})
    registered = settings.pop("method", name)
    if registered not in METHODS:
        raise ValueError(f"unknown method {registered!r}; registered: {sorted(METHODS)}")
    return registered, settings


def bench_method(clip: SplitCLIP, name: str, batch_sizes: Sequence[int], kwargs: Optional[dict] = None,
                 warmup: bool = True, max_seconds: Optional[float] = None) -> List[Dict[str, Any]]:
    """One timed ``attribute`` call per batch size (default seed, so pair 0 uses seed 0).

    ``max_seconds``: a batch size whose estimated time (the latest measured seconds per pair — the 1-pair
    warm-up's, then each timed batch's — × the batch size) exceeds it is not run; its row says so
    (``"skipped"``, ``"estimated_s"``) instead of carrying timings. None = run every batch size.
    ``kwargs`` may name the registered method (``"method"``, :func:`resolve`); with ``compile=True`` each batch
    size is first run untimed on the same shapes (module docstring).
    """
    registered, settings = resolve(name, kwargs)
    method = METHODS[registered](clip, **settings)
    compiled = bool(settings.get("compile"))
    modality = method.modality_for("both")
    per_pair: Optional[float] = None
    if warmup and not compiled:  # a compiled variant warms up at each batch size's own shapes instead
        per_pair = seconds(lambda: method.attribute(*synthetic_pairs(clip, 1), modality=modality), clip.device)
    rows = []
    for b in batch_sizes:
        if max_seconds is not None and per_pair is not None and per_pair * b > max_seconds:
            rows.append(_skipped_row(name, kwargs, b, modality, per_pair * b, max_seconds))
            continue
        images, ids = synthetic_pairs(clip, b)  # [b, 3, H, W], [b, ctx]
        extra: Dict[str, Any] = {}
        if compiled:
            before = compile_counts()["graphs"]
            extra["compile_s"] = seconds(lambda: method.attribute(images, ids, modality=modality), clip.device)
            extra["compile_graphs"] = compile_counts()["graphs"] - before
        before = compile_counts()["graphs"]
        with measure(clip.device) as rec:
            method.attribute(images, ids, modality=modality)
        if compiled:
            extra["recompiles_timed"] = compile_counts()["graphs"] - before
        per_pair = rec["wall_s"] / b
        rows.append({"method": name, "settings": kwargs or {}, "batch_size": b, "modality": modality,
                     "pairs_per_s": b / rec["wall_s"], "s_per_pair": per_pair, **rec, **extra})
    return rows


def _reference_maps(clip: SplitCLIP, method: Attributor, loop: ReferenceLoop, images: Tensor, ids: Tensor,
                    seed: int, weight_grads: bool = True) -> Tuple[Tensor, Tensor, Dict[str, Any], Dict[str, Any]]:
    """``(image scores [T], text scores [L], image timing, text timing)`` of the reference loop on one pair.

    ``seed``: the global RNG's seed before the image map (stochastic loops only). ``weight_grads``: the
    model's weights require gradients (REFERENCE_NOTES' description of the official code; the backward then
    runs through the whole model) or stay frozen (the backward stops at the attributed site). The maps are the
    same either way (``tests/test_speed_options.py``); only the cost differs.
    """
    settings = loop.settings(method)
    timings, maps = [], []
    with loop_weights(clip.model, weight_grads) as model:
        if loop.stochastic:
            torch.manual_seed(seed)
        for name, tower in (("image", clip.image), ("text", clip.text)):
            with measure(clip.device) as rec:
                maps.append(loop.map(model, name, images, ids, method.layer_for(tower), **settings).detach())
            timings.append(rec)
    return maps[0], maps[1], timings[0], timings[1]


def _agreement(clip: SplitCLIP, method: Attributor, loop: ReferenceLoop, ours: Attribution, i: int, x: Tensor,
               t: Tensor, img: Tensor, txt: Tensor) -> Dict[str, Any]:
    """How the reference maps (``img`` ``[T]``, ``txt`` ``[L]``) of pair ``i`` agree with clipib's ``ours``:
    ρ, then the reference's own seed-to-seed ρ (stochastic loops) or the largest difference of the normalised
    maps."""
    gh, gw = clip.grid
    patches = img[img.shape[0] - gh * gw :]  # [gh·gw]: the patch tokens (after the class token)
    n = txt.shape[0]
    row: Dict[str, Any] = {"pair": i, "rho_image": spearman(ours.image_grid[i], patches),
                           "rho_text": spearman(ours.text_raw[i, :n], txt)}
    if loop.stochastic:
        img1, txt1, _, _ = _reference_maps(clip, method, loop, x, t, seed=1, weight_grads=False)
        row.update(rho_image_seed_to_seed=spearman(img, img1), rho_text_seed_to_seed=spearman(txt, txt1))
    else:
        ref = to_maps(clip, t, image=patches.view(1, gh, gw), text=txt[None])
        row.update(max_abs_diff_image=float((ours.image[i] - ref.image[0]).abs().max()),
                   max_abs_diff_text=float((ours.text[i] - ref.text[0]).abs().max()))
    return row


def bench_reference(clip: SplitCLIP, name: str, pairs: int = 1, kwargs: Optional[dict] = None) -> Dict[str, Any]:
    """Time the reference-shaped loop of ``name`` (a key of
    :data:`~clipib.bench.reference_loops.REFERENCE_LOOPS`) on ``pairs`` pairs and compare its maps with clipib's.

    A stochastic loop (M2IB): every pair with seeds 0 and 1 (ρ(clipib, reference) at seed 0 next to the
    reference's ρ(seed 0, seed 1)); the timing is the seed-0 run. A deterministic one (NIB): max abs
    difference of the normalised maps, and ρ. Each pair's loop is timed twice, with the weights requiring
    gradients (``timings``) and frozen (``timings_frozen``); ``s_per_pair``, which the speed-ups divide, is
    the faster of the two means — the stronger baseline.
    """
    loop = REFERENCE_LOOPS[name]
    method = METHODS[name](clip, **(kwargs or {}))
    why = loop.mismatch(method)
    if why is not None:
        raise ValueError(why)
    images, ids = synthetic_pairs(clip, pairs)  # [pairs, 3, H, W], [pairs, ctx]
    ours = method.attribute(images, ids, seeds=[0] * pairs)
    timings, frozen, agreement = [], [], []
    for i in range(pairs):
        x, t = images[i : i + 1], ids[i : i + 1]
        img, txt, t_img, t_txt = _reference_maps(clip, method, loop, x, t, seed=0)
        timings.append({"pair": i, "image": t_img, "text": t_txt, "s_per_pair": t_img["wall_s"] + t_txt["wall_s"]})
        _, _, f_img, f_txt = _reference_maps(clip, method, loop, x, t, seed=0, weight_grads=False)
        frozen.append({"pair": i, "image": f_img, "text": f_txt, "s_per_pair": f_img["wall_s"] + f_txt["wall_s"]})
        agreement.append(_agreement(clip, method, loop, ours, i, x, t, img, txt))
    with_grads = sum(r["s_per_pair"] for r in timings) / pairs
    without = sum(r["s_per_pair"] for r in frozen) / pairs
    s_per_pair = min(with_grads, without)
    return {"method": name, "pairs": pairs, "s_per_pair": s_per_pair, "pairs_per_s": 1 / s_per_pair,
            "s_per_pair_weight_grads": with_grads, "s_per_pair_frozen": without,
            "timings": timings, "timings_frozen": frozen, "agreement": agreement}


def run_benchmark(clip: SplitCLIP, methods: Optional[Sequence[str]] = None, batch_sizes: Sequence[int] = (1, 8, 32),
                  reference_pairs: int = 1, method_kwargs: Optional[Dict[str, dict]] = None, warmup: bool = True,
                  flops: bool = True, on_method: Optional[Callable[[Dict[str, Any]], None]] = None,
                  max_seconds: Optional[float] = None) -> Dict[str, Any]:
    """The whole benchmark as a JSON-ready dict: ``meta``, ``rows``, ``reference``, ``flops``.

    Args:
        methods: registered names (default: every method in :data:`clipib.METHODS` but those that need an eval
            batch, ``NEEDS_BATCH``: the oracle).
        reference_pairs: pairs for the reference loops (0 = no reference, no speed-up).
        method_kwargs: constructor settings per method name.
        flops: count FLOPs and compare with the measured matmul rate (:mod:`clipib.bench.flops`).
        on_method: called with the partial result after each method (e.g. to save it, so that a run killed
            later keeps the methods already measured).
        max_seconds: per (method, batch size) budget; see :func:`bench_method`.
    """
    methods = list(methods) if methods else sorted(m for m, c in METHODS.items() if not c.NEEDS_BATCH)
    kwargs = method_kwargs or {}
    unknown = [m for m in methods if kwargs.get(m, {}).get("method", m) not in METHODS]
    if unknown:
        raise ValueError(f"unknown methods {unknown}; registered: {sorted(METHODS)} (a variant names its "
                         'method in --settings: {"variant": {"method": "m2ib", ...}})')
    registered = {m: resolve(m, kwargs.get(m))[0] for m in methods}
    batch_only = [m for m in methods if METHODS[registered[m]].NEEDS_BATCH]
    if batch_only:
        raise ValueError(f"{batch_only} need an eval batch (ground truth) and have no throughput of their own")
    out: Dict[str, Any] = {"meta": machine_info(clip.device), "rows": [], "reference": {}, "flops": {}}
    out["meta"]["model"] = clip.name
    out["meta"]["max_seconds"] = max_seconds
    for name in tqdm(methods, desc="clipib bench", unit="method", file=sys.stderr):
        out["rows"] += bench_method(clip, name, batch_sizes, kwargs.get(name), warmup, max_seconds)
        if name in REFERENCE_LOOPS and name == registered[name] and reference_pairs > 0:
            settings = resolve(name, kwargs.get(name))[1]
            ref = bench_reference(clip, name, reference_pairs, settings)
            out["reference"][name] = ref
            if flops:
                out["flops"][name] = flop_report(clip, name, settings, out["rows"], ref)
        _speedups(out, registered)
        if on_method is not None:
            on_method(out)
    out["meta"]["load_average_after"] = load_average()
    out["meta"]["compile_counts"] = compile_counts()
    return out


def _speedups(out: Dict[str, Any], registered: Dict[str, str]) -> None:
    """``speedup_vs_reference`` of every timed row whose registered method's reference loop has run."""
    for row in out["rows"]:
        ref = out["reference"].get(registered.get(row["method"], row["method"]))
        if ref is not None and "skipped" not in row:
            row["speedup_vs_reference"] = ref["s_per_pair"] / row["s_per_pair"]


def _fmt(x: Any, digits: int = 3) -> str:
    return f"{x:.{digits}g}" if isinstance(x, float) else str(x)


def _fmt_agreement(key: str, value: float) -> str:
    return f"{key} {value:.2e}" if key.startswith("max_abs") else f"{key} {value:.4f}"


def _table(caption: Optional[str], columns: Sequence[str]) -> List[str]:
    """The head of a markdown table: an optional caption paragraph, the column names and the rule."""
    head = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    return head if caption is None else ["", caption, "", *head]


def _throughput_lines(rows: List[Dict[str, Any]]) -> List[str]:
    lines = _table(None, ["method", "settings", "batch", "modality", "pairs/s", "s/pair", "CPU s/pair", "peak MiB",
                          "speed-up vs reference", "compile s / graphs / recompiles timed"])
    for r in rows:
        row = f"| {r['method']} | {r['settings'] or ''} | {r['batch_size']} | {r['modality']} | "
        if "skipped" in r:
            lines.append(row + f"not run: {r['skipped']} | | | | | |")
            continue
        comp = (f"{_fmt(r['compile_s'])} / {r['compile_graphs']} / {r['recompiles_timed']}"
                if "compile_s" in r else "–")
        lines.append(row + f"{_fmt(r['pairs_per_s'])} | {_fmt(r['s_per_pair'])} | "
                     f"{_fmt(r['cpu_s'] / r['batch_size'])} | {r['peak_mb']:.0f} | "
                     f"{_fmt(r.get('speedup_vs_reference', '–'))} | {comp} |")
    return lines


def _reference_lines(reference: Dict[str, Any]) -> List[str]:
    lines = _table("Reference-shaped loops (one pair at a time; image / text map seconds with the weights requiring "
                   "gradients, then frozen; speed-ups divide the faster mean):",
                   ["method", "pair", "weights requiring grad: image / text s", "s/pair", "frozen: image / text s",
                    "s/pair", "peak MiB", "agreement with clipib"])
    for name, ref in reference.items():
        for t, f, a in zip(ref["timings"], ref["timings_frozen"], ref["agreement"]):
            agree = ", ".join(_fmt_agreement(k, v) for k, v in a.items() if k != "pair")
            peak = max(t["image"]["peak_mb"], t["text"]["peak_mb"])
            lines.append(f"| {name} | {t['pair']} | {_fmt(t['image']['wall_s'])} / {_fmt(t['text']['wall_s'])} | "
                         f"{_fmt(t['s_per_pair'])} | {_fmt(f['image']['wall_s'])} / {_fmt(f['text']['wall_s'])} | "
                         f"{_fmt(f['s_per_pair'])} | {peak:.0f} | {agree} |")
    return lines


def _flops_lines(flops: Dict[str, Any]) -> List[str]:
    lines = _table("FLOP floor per pair (FlopCounterMode counts; floor time = floor / measured matmul rate; the "
                   "reference with its weights requiring gradients / frozen):",
                   ["method", "floor GFLOP", "clipib GFLOP", "reference GFLOP", "matmul GFLOP/s", "floor s",
                    "clipib s/pair (× floor)", "reference s/pair (× floor)"])
    for name, f in flops.items():
        ours = ", ".join(f"b{k.split('_')[1]} {_fmt(v['s_per_pair'])} ({v['x_floor']:.1f}×)"
                         for k, v in f["clipib"].items())
        refs = " / ".join(f"{_fmt(f[k]['s_per_pair'])} ({f[k]['x_floor']:.1f}×)"
                          for k in ("reference", "reference_frozen"))
        lines.append(f"| {name} | {_fmt(f['floor_gflop_per_pair'])} | {_fmt(f['clipib_gflop_per_pair'])} | "
                     f"{_fmt(f['reference_gflop_per_pair'])} / {_fmt(f['reference_frozen_gflop_per_pair'])} | "
                     f"{_fmt(f['matmul_gflop_per_s'])} | {_fmt(f['floor_s_per_pair'])} | {ours} | {refs} |")
    return lines


def markdown(result: Dict[str, Any]) -> str:
    """The benchmark as markdown tables (throughput, reference loops, agreement, FLOP floor)."""
    meta = result["meta"]
    lines = [f"Model `{meta.get('model', '')}`, device `{meta['device']}` {meta.get('device_name', '')}, "
             f"{meta['cpu_count']} CPUs, {meta['torch_threads']} torch threads, torch {meta['torch']}, "
             f"{meta['date_utc']}; load average {meta['load_average_1_5_15']} before, "
             f"{meta.get('load_average_after')} after.", "", *_throughput_lines(result["rows"])]
    if result["reference"]:
        lines += _reference_lines(result["reference"])
    if result["flops"]:
        lines += _flops_lines(result["flops"])
    return "\n".join(lines) + "\n"


def add_arguments(parser: Any) -> None:
    """The options of ``clipib bench`` / ``benchmarks/throughput.py``."""
    parser.add_argument("--methods", nargs="*", default=None, help="registered names (default: all)")
    parser.add_argument("--batch-sizes", nargs="+", type=int, default=[1, 8, 32])
    parser.add_argument("--model", default="ViT-B-32-quickgelu", help="open_clip name or JSON config")
    parser.add_argument("--pretrained", default="none", help="weights (default: none = random, seed 0)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--reference-pairs", type=int, default=1, help="pairs for the reference loops (0: none)")
    parser.add_argument("--settings", default="{}", help='JSON {"method": {constructor settings}}')
    parser.add_argument("--no-flops", action="store_true", help="skip the FLOP counts")
    parser.add_argument("--no-warmup", action="store_true")
    parser.add_argument("--max-seconds", type=float, default=None,
                        help="skip a (method, batch size) whose estimated time exceeds this (default: run all)")
    parser.add_argument("--out", default="outputs/bench/throughput.json", help="JSON output (.md written next to it)")


def run_from_args(args: Any) -> Dict[str, Any]:
    """Run the benchmark from parsed :func:`add_arguments` options; write JSON and markdown, print the tables."""
    import json
    from pathlib import Path

    from clipib.models.loading import load_clip

    try:
        settings = json.loads(args.settings)
    except json.JSONDecodeError as err:
        raise ValueError(f"--settings is not valid JSON: {err}") from err
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)

    def save(result: Dict[str, Any]) -> str:
        out.write_text(json.dumps(result, indent=2))
        table = markdown(result)
        out.with_suffix(".md").write_text(table)
        return table

    threads = torch.get_num_threads()
    torch.set_num_threads(args.threads or threads)
    try:
        torch.manual_seed(0)
        pretrained = None if str(args.pretrained).lower() == "none" else args.pretrained
        clip = load_clip(args.model, pretrained=pretrained, device=args.device)
        result = run_benchmark(clip, args.methods, args.batch_sizes, args.reference_pairs, settings,
                               warmup=not args.no_warmup, flops=not args.no_flops, on_method=save,
                               max_seconds=args.max_seconds)
    finally:
        torch.set_num_threads(threads)
    print(save(result))
    return result
