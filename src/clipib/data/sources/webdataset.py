"""Streaming webdataset shards (LAION-400M style ``.jpg`` + ``.txt``), each sample exactly once.

Shards are given as local paths, brace patterns (``shards/{00000..01241}.tar``, ``::``-separated
lists) or anything webdataset's ``gopen`` opens (``pipe:curl -s …``, ``http(s)://…``); expansion,
opening and grouping members into samples are webdataset's own (``expand_urls``, ``SimpleShardList``,
``url_opener``, ``group_by_keys``). Members are read by :func:`clipib.untrusted.tar_members`, which checks each
member's size in its tar header before reading it (webdataset's ``tarfile_to_samples`` reads every member
whole, and its ``select_files`` hook sees only the name): a member past ``max_member_bytes`` (default
:data:`clipib.untrusted.MAX_MEMBER_BYTES`, 64 MiB) is skipped over unread.

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
image, a missing, empty or non-UTF-8 caption, an image or caption member larger than ``max_member_bytes``
(``member too large``), or an unsafe key (a member named ``../../evil.jpg``, an absolute path, a NUL;
:func:`clipib.untrusted.key_problem`) becomes a skip marker (key + reason, see :mod:`clipib.data.common`); a
shard that cannot be opened, a truncated tar or a file of random bytes becomes a skip marker keyed by the
shard name. Skips travel in the batches' ``"skipped"`` list. Members are read into memory, never extracted: no
member name becomes a path.

Excluded keys (a resumed run, :meth:`ShardDataset.exclude`) are dropped on the raw sample's key, before
its image or caption is decoded. YAML::

    dataset:
      class_path: clipib.data.sources.webdataset.ShardDataset
      init_args: {shards: /data/laion400m/{00000..01241}.tar, split: auto}

Selection (``sample`` / ``mismatched`` / ``partition``, :class:`~clipib.data.sources.rows.Selection`, the options
of the table sources) runs as a first pass in :meth:`ShardDataset.prepare` that writes its work under
``manifest`` (a folder every process can read; :mod:`clipib.data.manifest`):

1. **scan**: every shard is read once (shards split over ranks), without decoding images; a part per shard
   lists its samples in stream order: ``{"k": key, "c": caption}``, or ``{"k": key, "s": reason}`` for a sample
   that cannot be used (no image member, missing / empty / non-UTF-8 caption, an image or caption member too
   large to read; a shard that cannot be read).
   Parts are reused by later runs over the same shards (they hold keys and captions only).
2. **select**: the usable samples, numbered in shard order, are sampled by position (the table sources'
   :func:`~clipib.data.selection.sample_positions`, so a table with the same usable rows in the same order picks
   the same pairs), per run seed with ``resample``; only the picked samples' lines are kept in memory. Then
   ``mismatched`` (captions of other picked samples) and, for ``partition``, a **score** pass: the picked
   images are decoded and scored with the model's scorer, shards split over ranks, a part per shard.
3. the **manifest** ``selection-<hash>.jsonl``: one line per evaluated pair (``key``, ``image_key``,
   ``caption``, ``matched``, ``similarity``, ``run_seeds``), written by rank 0 and read by every process.

The evaluation pass then reads only the shards that hold a manifest image, decodes each such image once and
yields its manifest pairs (two with ``mismatched: both``). A manifest image missing from its shard is reported
as a skip. Without ``sample``, every sample's scan line is held in memory: at LAION scale, sample.
"""

from __future__ import annotations

import os
import re
from dataclasses import asdict
from itertools import islice
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, Iterator, List, Literal, Optional, Sequence, Set, Tuple, Union

import torch
import webdataset as wds
from torch.utils.data import IterableDataset

import clipib.data.manifest as manifest
import clipib.data.selection as selection
import clipib.untrusted as untrusted
from clipib.data.common import IMAGE_ERRORS, Item, Row, decode_caption, decode_image, image_error, skip_item
from clipib.data.sources.base import Source
from clipib.data.sources.rows import Selection, draw_info

ShardSpec = Union[str, Sequence[str]]
IMAGE_EXTS = ("jpg", "jpeg", "png", "webp", "bmp")
CAPTION_EXTS = ("txt", "caption", "text")
SPLITS = ("auto", "shard", "sample")
_META = re.compile(r"__[^/]*__($|/)")  # webdataset's metadata members, which it leaves out of samples


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


def _shard_files(src: Iterable[Dict[str, Any]], handler: Callable[[Exception], bool],
                 max_member_bytes: int) -> Iterator[Dict[str, Any]]:
    """webdataset's member stream (``{"fname", "data", "__url__"}``, ``{}`` at the end of each shard) for opened
    shards, read by :func:`clipib.untrusted.tar_members`: an oversized member's ``data`` is a
    :class:`~clipib.untrusted.Rejected`. webdataset's metadata members (``__name__``) are left out, as it does.
    A shard's read error goes to ``handler`` (with the shard's URL in its args), which says whether to go on."""
    for source in wds.tariterators.url_opener(src, handler=handler):
        try:
            for name, data in untrusted.tar_members(source["stream"], max_member_bytes):
                if not _META.match(name):
                    yield {"fname": name, "data": data, "__url__": source["url"]}
            yield {}
        except Exception as exn:  # tarfile's errors on truncated or random data, the stream's OSErrors, ...
            exn.args = exn.args + (source["url"],)
            if not handler(exn):
                break


def tar_samples(src: Iterable[Dict[str, Any]], handler: Callable[[Exception], bool] = wds.reraise_exception,
                max_member_bytes: int = untrusted.MAX_MEMBER_BYTES) -> Iterator[Dict[str, Any]]:
    """webdataset's ``tarfile_samples`` (opened shards -> samples ``{"__key__", "__url__", ext: bytes}``) with the
    member size bound: a member past ``max_member_bytes`` is a :class:`~clipib.untrusted.Rejected`, not bytes."""
    return wds.tariterators.group_by_keys(_shard_files(src, handler, max_member_bytes), handler=handler)


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
        selection: ``sample`` / ``resample`` / ``mismatched`` / ``partition`` as for the table sources; runs a
            first pass (module docstring) that needs ``manifest``.
        manifest: folder for the first pass's parts and the manifest (shared by every process; reused by later
            runs over the same shards).
        max_member_bytes: largest member read, by its tar header's size (default
            :data:`clipib.untrusted.MAX_MEMBER_BYTES`, 64 MiB); a sample whose image or caption member is larger
            is a ``member too large`` skip and that member is skipped over unread.

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
        selection: Optional[Selection] = None,
        manifest: Optional[str] = None,
        max_member_bytes: int = untrusted.MAX_MEMBER_BYTES,
    ) -> None:
        super().__init__()
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        self.urls = expand_shards(shards)
        self.rank: Optional[int] = None
        self.world_size: Optional[int] = None
        self.split = split
        self.image_exts, self.caption_exts = tuple(image_exts), tuple(caption_exts)
        self.selection = selection or Selection()
        opts = self.selection
        if (opts.sample or opts.mismatched or opts.partition) and not manifest:
            raise ValueError("ShardDataset: sample / mismatched / partition run a first pass over the shards that "
                             "writes a manifest; give manifest: <a folder every process can read>")
        self.manifest = manifest
        if max_member_bytes < 1:
            raise ValueError(f"max_member_bytes must be positive, got {max_member_bytes}")
        self.max_member_bytes = int(max_member_bytes)
        self.rows: Optional[List[Row]] = None  # the manifest's pairs (selection only)
        self._info: Dict[str, Any] = {}

    @property
    def selecting(self) -> bool:
        """Whether a selection option is set (evaluation then follows the manifest)."""
        opts = self.selection
        return bool(opts.sample or opts.mismatched or opts.partition)

    def prepare(self, rank: Optional[int], world_size: Optional[int], batch_size: int, num_workers: int) -> None:
        """Remember this process's place in the world, check that the local shards exist and, with a selection,
        run the first pass and read its manifest (every process: it is a collective step under DDP)."""
        local = [u for u in self.urls if is_local(u)]
        if local and not any(os.path.exists(u) for u in local):
            raise FileNotFoundError(f"none of the {len(local)} shards exists (first: {local[0]})")
        self.rank, self.world_size = rank, world_size
        if self.selecting and self.rows is None:
            grid_rank, grid_world = worker_grid(rank, world_size)[:2]
            self.rows = self.first_pass(grid_rank, grid_world, batch_size)
            self._info["rows"] = len(self.rows)

    def _read(self, handler: Callable[[Exception], bool]) -> Any:
        """The pipeline stage shards -> raw samples (:func:`tar_samples` with this source's member bound)."""
        return wds.filters.pipelinefilter(tar_samples)(handler=handler, max_member_bytes=self.max_member_bytes)

    # ---- first pass: scan, select, score, manifest -------------------------------------------------------

    def _folder(self) -> Path:
        return Path(str(self.manifest))

    def scan_paths(self) -> List[Path]:
        """The scan part of each shard (named by position, shard name and a digest of its URL, extensions and member
        bound)."""
        digest = lambda u: manifest.spec_hash([u, self.image_exts, self.caption_exts, self.max_member_bytes])  # noqa: E731
        return [self._folder() / "scan" / f"{i:05d}-{shard_name(u)}-{digest(u)}.jsonl" for i, u in enumerate(self.urls)]

    def scan_shard(self, index: int) -> List[Dict[str, Any]]:
        """Scan lines of shard ``index`` in stream order (keys and captions; images are not decoded)."""
        lines: List[Dict[str, Any]] = []
        failed: Set[str] = set()

        def handler(exn: Exception) -> bool:
            item = self._error_item(exn)
            if item["key"] not in failed:
                failed.add(item["key"])
                lines.append({"k": item["key"], "s": item["skip"]})
            return True

        for raw in wds.DataPipeline(wds.SimpleShardList([self.urls[index]]), self._read(handler)):
            key = self.raw_key(raw)
            image_ext = next((e for e in self.image_exts if e in raw), None)
            if image_ext is None:
                lines.append({"k": key, "s": "missing image"})
                continue
            caption_ext = next((e for e in self.caption_exts if e in raw), None)
            too_large = _too_large(raw, image_ext, caption_ext)
            if too_large is not None:
                lines.append({"k": key, "s": too_large["skip"]})
                continue
            try:
                lines.append({"k": key, "c": decode_caption(raw[caption_ext] if caption_ext else None)})
            except ValueError as exn:
                lines.append({"k": key, "s": str(exn)})
        return lines

    def first_pass(self, rank: int, world: int, batch_size: int) -> List[Row]:
        """Scan (shared over ranks), select, score (``partition``), write and read the manifest."""
        opts = self.selection
        scans = self.scan_paths()
        manifest.shared_work(scans, self.scan_shard, rank, world)
        draws = selection.plan_draws(opts.sample, opts.resample, opts.sample_seed, opts.mismatch_seed, self.run_seeds)
        picks, by_position = self._pick(scans, draws)
        score = lambda rows: self._score(rows, rank, world, batch_size)  # noqa: E731
        rows, bounds = selection.finish_draws(draws, [[by_position[i] for i in p] for p in picks], opts.mismatched,
                                              opts.partition, opts.partition_thresholds, score)
        if bounds is not None:
            self._info["partition_bounds"] = bounds
        self._info.update(draw_info(opts, draws))
        spec = {"shards": self.urls, "exts": [self.image_exts, self.caption_exts], "selection": asdict(opts),
                "max_member_bytes": self.max_member_bytes,
                "draws": [asdict(d) for d in draws]}
        if opts.partition:
            spec["scorer"] = manifest.scorer_fingerprint(self.need_transforms().score, self.need_transforms().image_size)
        path = self._folder() / f"selection-{manifest.spec_hash(spec)}.jsonl"
        if rank == 0 or not manifest.distributed():
            manifest.write_lines(path, rows)
        manifest.barrier()
        self._info["manifest"] = str(path)
        return list(manifest.read_lines(path))

    def _pick(self, scans: List[Path], draws: List[selection.Draw]) -> Tuple[List[List[int]], Dict[int, Row]]:
        """Each draw's positions and the rows at them: usable samples numbered in shard order (``sample``), or
        every scan line, unusable ones as skip rows (no ``sample``)."""
        opts = self.selection
        if not opts.sample:
            rows = [_scan_row(line) for path in scans for line in manifest.read_lines(path)]
            return [list(range(len(rows)))], dict(enumerate(rows))
        counts = [sum(1 for line in manifest.read_lines(path) if "c" in line) for path in scans]
        total = sum(counts)
        picks = [selection.sample_positions(total, opts.sample, d.sample_seed) for d in draws]
        wanted = sorted(set().union(*picks))
        by_position: Dict[int, Row] = {}
        start, cursor = 0, 0  # first position of the current shard; index into `wanted`
        for path, count in zip(scans, counts):
            if cursor < len(wanted) and wanted[cursor] < start + count:
                usable = (line for line in manifest.read_lines(path) if "c" in line)
                for position, line in enumerate(usable, start):
                    if cursor < len(wanted) and position == wanted[cursor]:
                        by_position[position] = _scan_row(line)
                        cursor += 1
            start += count
        return picks, by_position

    def score_paths(self, rows: List[Row]) -> Tuple[List[int], List[Path]]:
        """The shards holding the images of ``rows`` and each one's score part (named after the model and pairs)."""
        names = {shard_name(u): i for i, u in enumerate(self.urls)}
        shards = sorted({names[r["image_key"].split("/", 1)[0]] for r in rows if "skip" not in r})
        transforms = self.need_transforms()
        fingerprint = manifest.scorer_fingerprint(transforms.score, transforms.image_size)
        paths = []
        for i in shards:
            pairs = sorted((r["key"], r["caption"]) for r in rows if "skip" not in r and _shard_of(r) == shard_name(self.urls[i]))
            paths.append(self._folder() / "scores" / f"{i:05d}-{manifest.spec_hash([self.urls[i], fingerprint, pairs])}.jsonl")
        return shards, paths

    def _score(self, rows: List[Row], rank: int, world: int, batch_size: int) -> List[Optional[List[float]]]:
        """Similarity of each row's image with its caption (``None`` for skips and undecodable images): the images
        are read from their shards, shards split over ranks, a part per shard."""
        transforms = self.need_transforms()
        if transforms.score is None:
            raise ValueError("this data option needs CLIP scores: hand the model with datamodule.use_model(clip)")
        shards, paths = self.score_paths(rows)

        def compute(j: int) -> List[Dict[str, Any]]:
            mine = [r for r in rows if "skip" not in r and _shard_of(r) == shard_name(self.urls[shards[j]])]
            return self._score_shard(shards[j], mine, batch_size)

        manifest.shared_work(paths, compute, rank, world)
        scores: Dict[str, Optional[List[float]]] = {}
        for path in paths:
            scores.update({line["key"]: line["s"] for line in manifest.read_lines(path)})
        return [scores.get(r["key"]) for r in rows]

    def _score_shard(self, index: int, rows: List[Row], batch_size: int) -> List[Dict[str, Any]]:
        """Score ``rows`` whose images are in shard ``index`` (each image decoded once)."""
        transforms = self.need_transforms()
        by_image: Dict[str, List[Row]] = {}
        for r in rows:
            by_image.setdefault(r["image_key"], []).append(r)
        images, captions, keys, out = [], [], [], []
        for raw in wds.DataPipeline(wds.SimpleShardList([self.urls[index]]), self._read(wds.ignore_and_continue)):
            mine = by_image.pop(self.raw_key(raw), None)
            if not mine:
                continue
            item = self.decode(raw, transforms.preprocess)
            for r in mine:
                if "skip" in item:
                    out.append({"key": r["key"], "s": None})
                else:
                    images.append(item["image"])
                    captions.append(r["caption"])
                    keys.append(r["key"])
        for start in range(0, len(keys), max(batch_size, 1)):
            with torch.no_grad():
                sims = transforms.score(torch.stack(images[start : start + batch_size]), captions[start : start + batch_size])
            out += [{"key": k, "s": [float(v)]} for k, v in zip(keys[start : start + batch_size], sims.flatten().tolist())]
        out += [{"key": r["key"], "s": None} for rest in by_image.values() for r in rest]  # not found in the shard
        return out

    def mode(self, slots: int) -> str:
        """The split actually used with ``slots`` rank x worker slots."""
        if self.split != "auto":
            return self.split
        return "shard" if len(self.urls) >= slots else "sample"

    def __iter__(self) -> Iterator[Item]:
        """Yield this slot's share of samples and skip markers (with a selection: of the manifest's pairs)."""
        if self.selecting:
            if self.rows is None:
                raise RuntimeError("ShardDataset.prepare(...) must run before items are read (it writes the manifest)")
            yield from self._iter_manifest()
            return
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
        stages.append(self._read(handler))
        if mode == "sample":
            stages.append(wds.filters.pipelinefilter(_slice)(slot, slots))
        report_errors = mode == "shard" or slot == 0  # in "sample" mode every slot sees the same errors
        preprocess = self.need_transforms().preprocess
        for raw in wds.DataPipeline(*stages):
            yield from self._drain(errors, report_errors)
            if self.raw_key(raw) not in self.excluded:  # a finished sample: not decoded
                yield self.decode(raw, preprocess)
        yield from self._drain(errors, report_errors)

    def _iter_manifest(self) -> Iterator[Item]:
        """This slot's share of the manifest's pairs: only shards holding a manifest image are read, each image is
        decoded once and yields every pair made with it; known skips and missing images are reported once."""
        rank, world, worker, n_workers = worker_grid(self.rank, self.world_size)
        slots, slot = world * n_workers, rank * n_workers + worker
        rows = [r for r in self.rows or [] if r["key"] not in self.excluded]
        by_image: Dict[str, List[Row]] = {}
        for r in rows:
            if "skip" not in r:
                by_image.setdefault(r["image_key"], []).append(r)
        if slot == 0:  # skips known from the scan: reported by one slot
            yield from ({"key": r["key"], "skip": r["skip"]} for r in rows if "skip" in r)  # reasons as scanned
        needed = {_shard_of(r) for pairs in by_image.values() for r in pairs}
        urls = [u for u in self.urls if shard_name(u) in needed]  # shards without a manifest image are not read
        mode = self.split if self.split != "auto" else "shard" if len(urls) >= slots else "sample"
        mine = urls[rank::world][worker::n_workers] if mode == "shard" else urls
        seen: Set[str] = set()

        def wanted(src: Iterable[dict]) -> Iterator[dict]:
            """The raw samples holding a manifest image, noted as seen (before any slot slicing)."""
            for raw in src:
                if self.raw_key(raw) in by_image:
                    seen.add(self.raw_key(raw))
                    yield raw

        stages: List[Any] = [wds.SimpleShardList(mine), self._read(wds.ignore_and_continue),
                             wanted] if mine else []
        if mine and mode == "sample":
            stages.append(wds.filters.pipelinefilter(_slice)(slot, slots))
        preprocess = self.need_transforms().preprocess
        for raw in (wds.DataPipeline(*stages) if mine else []):
            key = self.raw_key(raw)
            item = self.decode(raw, preprocess)
            for r in by_image[key]:
                yield _manifest_item(r, item)
        reported = {shard_name(u) for u in mine} if mode == "shard" else (needed if slot == 0 else set())
        for key, pairs in by_image.items():
            if key not in seen and key.split("/", 1)[0] in reported and (mode == "shard" or slot == 0):
                yield from (skip_item(r["key"], "image not found in its shard") for r in pairs)

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
        too_large = _too_large(raw, image_ext, caption_ext)
        if too_large is not None:
            return too_large
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


def _too_large(raw: dict, image_ext: str, caption_ext: Optional[str]) -> Optional[Item]:
    """The ``member too large`` skip of a raw sample whose image or caption member was not read (else None); other
    members, which clipib does not use, may be too large without harm."""
    for ext in (image_ext, caption_ext):
        if ext is not None and isinstance(raw[ext], untrusted.Rejected):
            return skip_item(ShardDataset.raw_key(raw), raw[ext].reason, f".{ext}: {raw[ext].detail}")
    return None


def _scan_row(line: Dict[str, Any]) -> Row:
    """A selection row from a scan line: ``{"key", "image_key", "caption"}`` or a skip row."""
    if "c" in line:
        return {"key": line["k"], "image_key": line["k"], "caption": line["c"]}
    return {"key": line["k"], "image_key": line["k"], "caption": "", "skip": line["s"]}


def _shard_of(row: Row) -> str:
    """The shard name of a row's image (keys are ``"<shard name>/<member key>"``)."""
    return row["image_key"].split("/", 1)[0]


def _manifest_item(row: Row, item: Item) -> Item:
    """The item of one manifest pair from its decoded image's item (a skip stays a skip, under the pair's key)."""
    if "skip" in item:
        return {"key": row["key"], "skip": item["skip"]}
    out = {"key": row["key"], "image": item["image"], "caption": row["caption"], "matched": bool(row.get("matched", True))}
    if "similarity" in row:
        out["similarity"] = float(row["similarity"])
    if "run_seeds" in row:
        out["run_seeds"] = list(row["run_seeds"])
    return out
