"""Files of a selection's first pass, shared by every process: per-item JSON-lines parts, the work split over
ranks, and the manifest the evaluation pass reads (used by :class:`clipib.data.sources.webdataset.ShardDataset`).

A part is written to ``<name>.tmp`` and renamed, so a part that exists is complete: a killed first pass resumes
with the parts it finished. Work over many items (one per shard) is split by rank — rank ``r`` of ``W`` does items
``r, r + W, …`` — then every process waits for the others (a ``torch.distributed`` barrier) and reads every part;
without a process group (one process, or ranks simulated one after another) a process does what is missing
itself. The result depends only on the parts, never on which process wrote them, so 1 and N processes agree.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, Iterator, Sequence

import torch
import torch.distributed as dist

from clipib.data.common import Score


def distributed() -> bool:
    """Whether a process group with more than one process is running."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def barrier() -> None:
    """Wait for every process (nothing to wait for without a process group)."""
    if distributed():
        dist.barrier()


def write_lines(path: Path, rows: Iterable[Dict[str, Any]]) -> None:
    """Write ``rows`` as JSON lines to ``path`` atomically (temporary file, then rename)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    os.replace(tmp, path)


def read_lines(path: Path) -> Iterator[Dict[str, Any]]:
    """Stream the JSON lines of a part written by :func:`write_lines` (plain JSON: nothing is unpickled)."""
    with open(path, encoding="utf-8") as f:
        for line in f:
            yield json.loads(line)


def shared_work(paths: Sequence[Path], compute: Callable[[int], Iterable[Dict[str, Any]]], rank: int, world: int) -> None:
    """Make sure part ``paths[i]`` exists for every ``i``: this rank computes its share (``i % world == rank``)
    of the missing ones with ``compute(i)``, waits for the others, then computes whatever is still missing
    (only without a process group: a simulated rank, or a process that has no peers)."""
    for i in range(rank, len(paths), max(world, 1)):
        if not paths[i].exists():
            write_lines(paths[i], compute(i))
    barrier()
    for i, path in enumerate(paths):
        if not path.exists():
            if distributed():
                raise RuntimeError(f"first-pass part {path} is missing after every process finished its share")
            write_lines(path, compute(i))


def spec_hash(spec: Any) -> str:
    """16 hex digits of the SHA-256 of ``spec`` as canonical JSON (names a manifest after what made it)."""
    return hashlib.sha256(json.dumps(spec, sort_keys=True, default=str).encode()).hexdigest()[:16]


def scorer_fingerprint(score: Score, image_size: Sequence[int]) -> str:
    """A short fingerprint of a pair scorer (the model): its score of a fixed grey image with a fixed caption.

    Scores saved by one model are then never reused for another. Under DDP rank 0's fingerprint is broadcast,
    so every process names the parts alike even if devices round differently.
    """
    probe = torch.full((1, 3, *image_size), 0.25)
    with torch.no_grad():
        value = float(score(probe, ["a photo of a grey square"]).flatten()[0])
    box = [f"{value:.6e}"]
    if distributed():
        dist.broadcast_object_list(box, src=0)
    return box[0]
