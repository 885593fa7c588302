"""Checks of the CUDA path (issue 7), run by ``benchmarks/gpu_check.sh``; also runs on the CPU (tests).

- placement: M2IB (both noise streams) and NIB run end to end on the device, maps finite, on the device;
- host-device ping-pong: synchronisations counted with ``torch.cuda.set_sync_debug_mode`` must not grow with
  M2IB's steps (``noise="device"``) or with NIB's chunks; seconds per extra step are reported too;
- agreement: the device's fp32 maps against the CPU's (TF32 off), TF32 / bf16 against fp32, the on-device
  noise stream against the official one next to the official stream's seed-to-seed ρ;
- memory: allocated memory after each of ``leak_batches`` batches must stay flat (no growth with pairs).

    python -m clipib.bench.cuda_checks --device cuda --out outputs/cuda_checks.json
"""

from __future__ import annotations

import argparse
import copy
import json
import warnings
from pathlib import Path
from typing import Any, Callable, Dict, List

import torch

import clipib
from clipib.attribution import Attribution
from clipib.bench.common import machine_info, synthetic_pairs
from clipib.bench.timing import attribution_rhos, rss_mib, seconds, start_timer, stop_timer


def count_syncs(fn: Callable[[], Any], device: torch.device) -> int:
    """Host-device synchronisations during ``fn()`` (CUDA's sync debug mode warnings; 0 off CUDA)."""
    if device.type != "cuda":
        fn()
        return 0
    torch.cuda.synchronize(device)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            fn()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return sum("synchroniz" in str(w.message) for w in caught)


def _rho(a: Attribution, b: Attribution, spans: torch.Tensor) -> Dict[str, float]:
    """Mean Spearman ρ over pairs of image grids and of text scores over ``spans`` ``[B, ctx]`` (SOT..EOT)."""
    img, txt = attribution_rhos(a, b, spans)
    return {"rho_image": sum(img) / len(img), "rho_text": sum(txt) / len(txt)}


def _maxdiff(a: Attribution, b: Attribution) -> Dict[str, float]:
    return {"max_abs_diff_image": float((a.image.cpu() - b.image.cpu()).abs().max()),
            "max_abs_diff_text": float((a.text.cpu() - b.text.cpu()).abs().max())}


def sync_checks(clip: clipib.SplitCLIP, images: torch.Tensor, ids: torch.Tensor) -> Dict[str, Any]:
    """Syncs and seconds of M2IB at 2 and 6 steps per noise stream, and of NIB unchunked vs 5 chunks."""
    dev, out = clip.device, {}
    for noise in ("device", "official"):
        runs = {s: clipib.M2IB(clip, steps=s, noise=noise) for s in (2, 6)}
        syncs = {s: count_syncs(lambda m=m: m.attribute(images, ids), dev) for s, m in runs.items()}
        secs = {s: seconds(lambda m=m: m.attribute(images, ids), dev) for s, m in runs.items()}
        out[f"m2ib_{noise}"] = {"syncs_2_steps": syncs[2], "syncs_6_steps": syncs[6],
                                "s_per_extra_step": (secs[6] - secs[2]) / 4}
    rows = images.shape[0] * 10
    syncs = [count_syncs(lambda c=c: clipib.NIB(clip, internal_batch_size=c).attribute(images, ids), dev)
             for c in (None, max(1, rows // 5))]
    out["nib"] = {"syncs_one_pass": syncs[0], "syncs_5_chunks": syncs[1]}
    out["ok"] = (out["m2ib_device"]["syncs_2_steps"] == out["m2ib_device"]["syncs_6_steps"]
                 and syncs[0] == syncs[1])
    return out


def agreement_checks(clip: clipib.SplitCLIP, images: torch.Tensor, ids: torch.Tensor) -> Dict[str, Any]:
    """Device fp32 vs CPU fp32 (TF32 off), TF32 and bf16 vs fp32, device noise vs official and vs seeds."""
    flags = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        cpu = copy.deepcopy(clip).to("cpu")
        seeds = list(range(images.shape[0]))
        spans = clip.text.span_mask(ids)  # [B, ctx]: SOT..EOT
        out: Dict[str, Any] = {}
        for name in ("m2ib", "nib"):
            here = clipib.METHODS[name](clip).attribute(images, ids, seeds=seeds)
            there = clipib.METHODS[name](cpu).attribute(images.cpu(), ids.cpu(), seeds=seeds)
            out[f"{name}_device_vs_cpu"] = {**_rho(here, there, spans), **_maxdiff(here, there)}
            for precision in ("tf32", "bf16"):
                other = clipib.METHODS[name](clip, precision=precision).attribute(images, ids, seeds=seeds)
                out[f"{name}_{precision}_vs_fp32"] = {**_rho(here, other, spans), **_maxdiff(here, other)}
        official = clipib.M2IB(clip).attribute(images, ids, seeds=seeds)
        out["m2ib_device_noise_vs_official"] = _rho(official, clipib.M2IB(clip, noise="device").attribute(
            images, ids, seeds=seeds), spans)
        out["m2ib_official_seed_to_seed"] = _rho(official, clipib.M2IB(clip).attribute(
            images, ids, seeds=[s + 1000 for s in seeds]), spans)
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = flags
    return out


def memory_checks(clip: clipib.SplitCLIP, name: str, batch: int, batches: int, **kwargs: Any) -> Dict[str, Any]:
    """Allocated memory (MiB; CUDA only, else RSS) after each of ``batches`` batches of ``batch`` pairs."""
    method = clipib.METHODS[name](clip, **kwargs)
    cuda = clip.device.type == "cuda"
    after: List[float] = []
    start = start_timer(clip.device)
    for i in range(batches):
        images, ids = synthetic_pairs(clip, batch, seed=i)
        method.attribute(images, ids)
        if cuda:
            torch.cuda.synchronize(clip.device)
            after.append(torch.cuda.memory_allocated(clip.device) / 2**20)
        else:
            after.append(rss_mib())
    elapsed, _ = stop_timer(clip.device, start)
    growth = after[-1] - after[0]
    return {"method": name, "pairs": batch * batches, "pairs_per_s": batch * batches / elapsed,
            "mib_after_each_batch": after, "growth_mib": growth,
            "ok": growth <= (1.0 if cuda else 64.0)}


def run_checks(clip: clipib.SplitCLIP, pairs: int = 4, leak_pairs: int = 1000, leak_batch: int = 100,
               **leak_kwargs: Any) -> Dict[str, Any]:
    """All checks on ``clip``'s device; ``ok`` is True when the sync and memory checks pass."""
    images, ids = synthetic_pairs(clip, pairs)
    out: Dict[str, Any] = {"meta": machine_info(clip.device)}
    out["placement"] = {}
    for label, method in (("m2ib_official", clipib.M2IB(clip)), ("m2ib_device", clipib.M2IB(clip, noise="device")),
                          ("nib", clipib.NIB(clip))):
        attr = method.attribute(images, ids)
        maps = (attr.image, attr.text, attr.image_grid, attr.text_raw)
        out["placement"][label] = all(m.device == clip.device and torch.isfinite(m).all() for m in maps)
    out["syncs"] = sync_checks(clip, images, ids)
    out["agreement"] = agreement_checks(clip, images, ids)
    batches = max(2, leak_pairs // leak_batch)
    out["memory"] = [memory_checks(clip, name, leak_batch, batches, **leak_kwargs.get(name, {}))
                     for name in ("nib", "m2ib")]
    out["ok"] = (all(out["placement"].values()) and out["syncs"]["ok"] and all(m["ok"] for m in out["memory"]))
    return out


def main() -> None:
    """``python -m clipib.bench.cuda_checks``: run :func:`run_checks` and write JSON; exit 1 if a check fails."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="ViT-B-32-quickgelu")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--pairs", type=int, default=4)
    parser.add_argument("--leak-pairs", type=int, default=1000)
    parser.add_argument("--leak-batch", type=int, default=100)
    parser.add_argument("--out", default="outputs/bench/cuda_checks.json")
    args = parser.parse_args()
    torch.manual_seed(0)
    clip = clipib.load_clip(args.model, pretrained=None, device=args.device)
    result = run_checks(clip, args.pairs, args.leak_pairs, args.leak_batch, m2ib={"noise": "device"})
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))
    raise SystemExit(0 if result["ok"] else 1)


if __name__ == "__main__":
    main()
