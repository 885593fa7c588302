"""Streaming webdataset shards (LAION-400M style ``.jpg`` + ``.txt``), each sample exactly once.

Shards are given as local paths, brace patterns (``shards/{00000..01241}.tar``, ``::``-separated
lists) or anything webdataset's ``gopen`` opens (``pipe:curl -s …``, ``http(s)://…``); expansion,
opening and tar parsing are webdataset's own (``expand_urls``, ``SimpleShardList``,
``tarfile_to_samples``).

Splitting (``split=``): the rank x DataLoader-worker grid has ``S = world_size * num_workers`` slots,
slot ``s = rank * num_workers + worker``.

* ``"shard"``: shards are dealt out by rank, then by worker — ``shards[rank::world_size]`` then
  ``[worker::num_workers]``, exactly what webdataset's ``split_by_node`` / ``split_by_worker`` do,
  but with the rank passed in explicitly (Lightning knows it; env vars may be unset in spawned
  workers). Each shard is read by one slot, so each sample is seen once; ranks may get unequal counts.
* ``"sample"``: every slot reads every shard in the same order and keeps sample ``i`` of the global
  stream when ``i % S == s`` (decoding only what it keeps). Exact for any number of shards, even
  fewer shards than slots, at the cost of S-fold reading.
* ``"auto"`` (default): ``"shard"`` when there are at least ``S`` shards, else ``"sample"``.

Both are deterministic and exact: no sample twice, none missing, and every rank ends by itself (no
padding, no collective calls), so a rank with fewer samples just finishes earlier.

Corrupt data never raises: a sample with an undecodable, truncated, empty or oversized image, a missing
image, a missing, empty or non-UTF-8 caption, or an unsafe key (a member named ``../../evil.jpg``, an
absolute path, a NUL; :func:`clipib.untrusted.key_problem`) becomes a skip marker (key + reason, see
:mod:`clipib.data.common`); a shard that cannot be opened, a truncated tar or a file of random bytes becomes
a skip marker keyed by the shard name. Skips travel in the batches' ``"skipped"`` list. Members are read
into memory by webdataset's tar reader, never extracted: no member name becomes a path.

Excluded keys (a resumed run, :meth:`ShardDataset.exclude`) are dropped on the raw sample's key, before
its image or caption is decoded. YAML::

    dataset:
      class_path: clipib.data.sources.webdataset.ShardDataset
      init_args: {shards: /data/laion400m/{00000..01241}.tar, split: auto}
"""

from __future__ import annotations

import os
import re
from itertools import islice
from typing import Any, Iterable, Iterator, List, Literal, Optional, Sequence, Tuple, Union

import webdataset as wds
from torch.utils.data import IterableDataset

import clipib.untrusted as untrusted
from clipib.data.common import IMAGE_ERRORS, Item, decode_image, image_error, skip_item
from clipib.data.sources.base import Source

ShardSpec = Union[str, Sequence[str]]
IMAGE_EXTS = ("jpg", "jpeg", "png", "webp", "bmp")
CAPTION_EXTS = ("txt", "caption", "text")
SPLITS = ("auto", "shard", "sample")


def expand_shards(spec: ShardSpec) -> List[str]:
    """Expand brace patterns / ``::`` lists (webdataset's ``expand_urls``) into a list of shard URLs."""
    patterns = [spec] if isinstance(spec, str) else list(spec)
    urls = [url for pattern in patterns for url in wds.shardlists.expand_urls(str(pattern))]
    if not urls:
        raise ValueError(f"no shards in {spec!r}")
    return urls


def is_local(url: str) -> bool:
    """Whether ``url`` names a local file (no ``scheme://`` and no ``pipe:``)."""
    return "://" not in url and not url.startswith("pipe:")


def shard_name(url: str) -> str:
    """Stable short name of a shard: the last ``*.tar`` component (``…/00012.tar`` -> ``00012``)."""
    found = re.findall(r"([^/\s]+?)\.(?:tar\.gz|tgz|tar)\b", url)
    return found[-1] if found else url


def _slice(src: Iterable[Any], start: int, step: int) -> Iterator[Any]:
    """Every ``step``-th element from ``start`` (webdataset's node/worker splitters, explicit ranks)."""
    yield from islice(src, start, None, step) if step > 1 else src


def worker_grid(rank: Optional[int], world_size: Optional[int]) -> Tuple[int, int, int, int]:
    """``(rank, world_size, worker, num_workers)``: webdataset's ``pytorch_worker_info`` with overrides."""
    env_rank, env_world, worker, num_workers = wds.utils.pytorch_worker_info()
    rank = env_rank if rank is None else rank
    world_size = env_world if world_size is None else world_size
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} outside world size {world_size}")
    return rank, world_size, worker, num_workers


class ShardDataset(Source, IterableDataset):
    """Iterable source over webdataset shards yielding clipib items (samples or skip markers).

    Args:
        shards: shard URLs / brace patterns (see module docstring).
        split: ``"auto"`` | ``"shard"`` | ``"sample"`` (module docstring).
        image_exts, caption_exts: member extensions tried in order for the image and the caption.

    The rank and world size come from :meth:`prepare` (the DataModule passes the trainer's; ``None`` reads
    them like webdataset does: ``RANK``/``WORLD_SIZE`` env vars, else ``torch.distributed``). Sample keys are
    ``"<shard name>/<__key__>"``, unique as long as shard file names are.
    """

    def __init__(
        self,
        shards: Union[str, List[str]],
        split: Literal["auto", "shard", "sample"] = "auto",
        image_exts: Sequence[str] = IMAGE_EXTS,
        caption_exts: Sequence[str] = CAPTION_EXTS,
    ) -> None:
        super().__init__()
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        self.urls = expand_shards(shards)
        self.rank: Optional[int] = None
        self.world_size: Optional[int] = None
        self.split = split
        self.image_exts, self.caption_exts = tuple(image_exts), tuple(caption_exts)

    def prepare(self, rank: Optional[int], world_size: Optional[int], batch_size: int, num_workers: int) -> None:
        """Remember this process's place in the world and check that the local shards exist."""
        local = [u for u in self.urls if is_local(u)]
        if local and not any(os.path.exists(u) for u in local):
            raise FileNotFoundError(f"none of the {len(local)} shards exists (first: {local[0]})")
        self.rank, self.world_size = rank, world_size

    def mode(self, slots: int) -> str:
        """The split actually used with ``slots`` rank x worker slots."""
        if self.split != "auto":
            return self.split
        return "shard" if len(self.urls) >= slots else "sample"

    def __iter__(self) -> Iterator[Item]:
        """Yield this slot's share of samples and skip markers."""
        rank, world, worker, n_workers = worker_grid(self.rank, self.world_size)
        slots, slot = world * n_workers, rank * n_workers + worker
        mode = self.mode(slots)
        errors: List[Item] = []

        failed: set = set()

        def handler(exn: Exception) -> bool:
            """webdataset exception handler: record a shard-level skip, then continue."""
            item = self._error_item(exn)
            if item["key"] not in failed:  # a truncated tar raises twice (member, then stream): report once
                failed.add(item["key"])
                errors.append(item)
            return True  # keep going with the next member / shard

        stages: List[Any] = [wds.SimpleShardList(self.urls)]
        if mode == "shard":
            stages += [wds.filters.pipelinefilter(_slice)(rank, world), wds.filters.pipelinefilter(_slice)(worker, n_workers)]
        stages.append(wds.tarfile_to_samples(handler=handler))
        if mode == "sample":
            stages.append(wds.filters.pipelinefilter(_slice)(slot, slots))
        report_errors = mode == "shard" or slot == 0  # in "sample" mode every slot sees the same errors
        preprocess = self.need_transforms().preprocess
        for raw in wds.DataPipeline(*stages):
            yield from self._drain(errors, report_errors)
            if self.raw_key(raw) not in self.excluded:  # a finished sample: not decoded
                yield self.decode(raw, preprocess)
        yield from self._drain(errors, report_errors)

    def _drain(self, errors: List[Item], report: bool) -> Iterator[Item]:
        """Yield (when ``report``) and clear the shard-level skips collected so far."""
        while errors:
            item = errors.pop(0)
            if report and item["key"] not in self.excluded:
                yield item

    def _error_item(self, exn: Exception) -> Item:
        text = " ".join(str(a) for a in exn.args)
        urls = [u for u in self.urls if u in text]
        key = shard_name(max(urls, key=len)) if urls else "<shard>"
        if isinstance(exn, OSError) and exn.strerror:
            msg = exn.strerror
        else:
            msg = str(exn.args[0]).split(" @ ")[0] if exn.args else ""
        return skip_item(key, "unreadable shard", f"{type(exn).__name__}: {untrusted.printable(msg)}")

    @staticmethod
    def raw_key(raw: dict) -> str:
        """The clipib key ``"<shard name>/<__key__>"`` of a raw webdataset sample."""
        return f"{shard_name(raw.get('__url__', ''))}/{raw['__key__']}"

    def decode(self, raw: dict, preprocess: Any) -> Item:
        """Raw webdataset sample (member bytes by extension) -> clipib item or skip marker."""
        key = self.raw_key(raw)
        problem = untrusted.key_problem(str(raw["__key__"]))
        if problem:  # a member named ../../evil.jpg, /etc/x.jpg, or with a NUL: refused, never decoded
            return skip_item(key, "unsafe key", problem)
        image_ext = next((e for e in self.image_exts if e in raw), None)
        if image_ext is None:
            return skip_item(key, "missing image")
        caption_ext = next((e for e in self.caption_exts if e in raw), None)
        try:
            caption, cut = untrusted.decode_caption(raw[caption_ext] if caption_ext else None)
        except untrusted.Rejected as exn:
            return skip_item(key, exn.reason, exn.detail)
        try:
            image = decode_image(raw[image_ext])
        except IMAGE_ERRORS as exn:
            return {"key": key, "skip": image_error(exn)}
        item = {"key": key, "image": preprocess(image), "caption": caption, "matched": True}
        return {**item, "caption_truncated": True} if cut else item
