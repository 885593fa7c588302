"""Per-pair cost of ROAR's image removal at a given resolution, as one DataLoader worker pays it.

What it times: for each pair, the keyed tie-break map, :func:`clipib.removal.top_fraction_mask` (75th
percentile, ``ties: rank``) and :func:`clipib.removal.remove_image` with each fill, one image at a time
(``DegradedDataset.degrade_image`` without the store read and the image decode, which it adds on top). Not
part of the test suite; the numbers go to docs/roar.md ("Data path").

    python benchmarks/roar_removal.py --size 224 --pairs 50 --threads 1
"""

from __future__ import annotations

import argparse
import os
import time

import torch

from clipib.removal import key_seeds, keyed_normal, remove_image, top_fraction_mask


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=224, help="image side in pixels")
    parser.add_argument("--pairs", type=int, default=50)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (a DataLoader worker has 1)")
    parser.add_argument("--fills", nargs="+", default=["mean", "blur", "road"])
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    gen = torch.Generator().manual_seed(0)
    images = torch.randn(args.pairs, 3, args.size, args.size, generator=gen)
    maps = torch.rand(args.pairs, args.size, args.size, generator=gen)
    keys = [f"pair{i:05d}" for i in range(args.pairs)]
    print(f"{args.size} px, {args.pairs} pairs, {args.threads} thread(s), load average {os.getloadavg()}")
    for fill in args.fills:
        start = time.perf_counter()
        for i, key in enumerate(keys):
            ties = keyed_normal(key_seeds([key]), (args.size, args.size))
            gone = top_fraction_mask(maps[i : i + 1], quantile=0.75, tiebreak=ties)
            remove_image(images[i : i + 1], gone, fill, seeds=key_seeds([key], 1))
        seconds = time.perf_counter() - start
        print(f"fill {fill:5s}: {args.pairs / seconds:8.1f} pairs/s per worker ({1000 * seconds / args.pairs:.1f} ms/pair)")


if __name__ == "__main__":
    main()
