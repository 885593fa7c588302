"""Map-style image-caption tables: Conceptual Captions TSV, ``caption,file_path`` CSV, Flickr8k JSON,
class folders with a prompt template.

Each reader returns *rows*: ``{"key": str, "image": path, "caption": str}`` (Flickr8k rows carry
``"candidates": [5 captions]`` until :func:`clipib.data.selection.choose_best_captions` picks one).
A row that cannot be used (missing image file, empty caption, malformed line) keeps its place with
``"skip": reason`` so it is reported exactly once through the batches (see :mod:`clipib.data.common`).
Keys are stable: the row index in the file (TSV, CSV), the image name (Flickr8k), the image path
relative to the root (folders). :class:`PairDataset` turns rows into items.
"""

from __future__ import annotations

import csv
import json
import os
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Union
from urllib.parse import unquote, urlparse

from torch.utils.data import Dataset

from clipib.data.common import IMAGE_ERRORS, Item, Preprocess, decode_image, image_error, skip_item

Row = Dict[str, Any]
PathLike = Union[str, os.PathLike]
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".gif", ".tif", ".tiff")


def _image_row(key: str, image: Path, caption: Optional[str]) -> Row:
    """A row, or a row marked ``skip`` when the caption is empty or the image file is missing."""
    row: Row = {"key": key, "image": str(image), "caption": (caption or "").strip()}
    if not row["caption"]:
        row["skip"] = "missing caption"
    elif not image.is_file():
        row["skip"] = f"missing image file {image}"
    return row


def resolve_image(ref: str, image_root: Path) -> Path:
    """Local path of an image reference: absolute, relative to ``image_root``, or — for an
    ``http(s)://`` URL, which clipib never downloads — the URL's file name inside ``image_root``."""
    if "://" in ref:
        return image_root / unquote(Path(urlparse(ref).path).name)
    path = Path(ref)
    return path if path.is_absolute() else image_root / path


def read_tsv(path: PathLike, image_root: Optional[PathLike] = None, header: bool = False) -> List[Row]:
    """Conceptual Captions TSV: ``caption<TAB>url_or_path`` per line (no header unless ``header``).

    No quoting (captions may contain quotes). Images resolve through :func:`resolve_image` against
    ``image_root`` (default: the TSV's folder). A line that is not UTF-8 or has no tab is a skip row.
    """
    path = Path(path)
    root = Path(image_root) if image_root is not None else path.parent
    lines = path.read_bytes().splitlines()[1 if header else 0 :]
    rows: List[Row] = []
    for i, raw in enumerate(lines):
        try:
            fields = raw.decode("utf-8").split("\t")
        except UnicodeDecodeError:
            fields = []
        if len(fields) < 2:
            rows.append({"key": str(i), "image": "", "caption": "", "skip": "malformed row (need UTF-8 caption<TAB>image)"})
            continue
        rows.append(_image_row(str(i), resolve_image(fields[1].strip(), root), fields[0]))
    return rows


def read_csv(path: PathLike, image_root: Optional[PathLike] = None) -> List[Row]:
    """NIB-style CSV with a header and columns ``caption`` and ``file_path`` (relative to
    ``image_root``, default the CSV's folder)."""
    path = Path(path)
    root = Path(image_root) if image_root is not None else path.parent
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        missing = {"caption", "file_path"} - set(reader.fieldnames or [])
        if missing:
            raise ValueError(f"{path}: CSV lacks column(s) {sorted(missing)}; need caption,file_path")
        return [_image_row(str(i), resolve_image(r["file_path"] or "", root), r["caption"]) for i, r in enumerate(reader)]


def read_flickr8k(path: PathLike, image_root: Optional[PathLike] = None) -> List[Row]:
    """Flickr8k ``en_val.json``: a list of ``{"image": name, "caption": [5 strings]}``.

    Rows carry all captions as ``"candidates"``; the evaluated caption is chosen afterwards with the
    model (:func:`clipib.data.selection.choose_best_captions`, NIB's protocol done against each
    row's own image) or by index.
    """
    path = Path(path)
    root = Path(image_root) if image_root is not None else path.parent
    entries = json.loads(path.read_text(encoding="utf-8"))
    if not isinstance(entries, list):
        raise ValueError(f"{path}: expected a JSON list of {{image, caption}} objects")
    rows: List[Row] = []
    seen: Dict[str, int] = {}
    for i, entry in enumerate(entries):
        name = str(entry.get("image", ""))
        caps = entry.get("caption", [])
        caps = [caps] if isinstance(caps, str) else [str(c).strip() for c in caps if str(c).strip()]
        key = name if name not in seen else f"{name}#{i}"
        seen[name] = i
        row = _image_row(key, resolve_image(name, root), caps[0] if caps else "")
        row["candidates"] = caps
        rows.append(row)
    return rows


def read_synonyms(source: Union[None, PathLike, Mapping[str, str]]) -> Dict[str, str]:
    """Class name -> text: a mapping, or a ``words.txt``-style file (``class<TAB>text`` per line)."""
    if source is None:
        return {}
    if isinstance(source, Mapping):
        return {str(k): str(v) for k, v in source.items()}
    out: Dict[str, str] = {}
    for line in Path(source).read_text(encoding="utf-8").splitlines():
        if "\t" in line:
            cls, text = line.split("\t", 1)
            out[cls.strip()] = text.strip()
    return out


def _images_in(folder: Path) -> List[Path]:
    """Sorted image files of a class folder (or of its ``images/`` subfolder, Tiny-ImageNet train)."""
    folder = folder / "images" if (folder / "images").is_dir() else folder
    return sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)


def read_folders(
    root: PathLike,
    template: str = "a photo of a {}",
    per_class: Optional[int] = None,
    synonyms: Union[None, PathLike, Mapping[str, str]] = None,
    annotations: Optional[PathLike] = None,
) -> List[Row]:
    """Class folders ``root/<class>/*.jpg`` captioned ``template.format(synonyms.get(class, class))``.

    ``per_class``: keep the first N images per class by file name (NIB's Tiny-ImageNet protocol: 5).
    ``annotations``: instead of folders, a ``name<TAB>class…`` file (Tiny-ImageNet
    ``val_annotations.txt``) for images in ``root/images`` (or ``root``).
    """
    root = Path(root)
    names = read_synonyms(synonyms)
    by_class: Dict[str, List[Path]] = {}
    if annotations is not None:
        folder = root / "images" if (root / "images").is_dir() else root
        for line in Path(annotations).read_text(encoding="utf-8").splitlines():
            fields = line.split("\t")
            if len(fields) >= 2:
                by_class.setdefault(fields[1].strip(), []).append(folder / fields[0].strip())
        by_class = {c: sorted(ps) for c, ps in by_class.items()}
    else:
        by_class = {d.name: _images_in(d) for d in sorted(root.iterdir()) if d.is_dir()}
    if not by_class:
        raise ValueError(f"{root}: no class folders (or annotated images) found")
    rows: List[Row] = []
    for cls in sorted(by_class):
        caption = template.format(names.get(cls, cls))
        for image in by_class[cls][:per_class]:
            rows.append(_image_row(str(image.relative_to(root)), image, caption))
    return rows


class PairDataset(Dataset):
    """Map-style dataset over rows; item ``i`` is a sample or a skip marker (never raises on bad images)."""

    def __init__(self, rows: List[Row], preprocess: Preprocess) -> None:
        self.rows = rows
        self.preprocess = preprocess

    def __len__(self) -> int:
        """Number of rows, skipped ones included (each is reported once)."""
        return len(self.rows)

    def __getitem__(self, index: int) -> Item:
        """Load row ``index``: ``{"key", "image", "caption", "matched"}`` or ``{"key", "skip"}``."""
        row = self.rows[index]
        if "skip" in row:
            return skip_item(row["key"], row["skip"])
        try:
            image = decode_image(row["image"])
        except IMAGE_ERRORS as exn:
            return skip_item(row["key"], image_error(exn))
        item = {"key": row["key"], "image": self.preprocess(image), "caption": row["caption"]}
        item["matched"] = bool(row.get("matched", True))
        try:
            item.update(self.extras(row, image.size))
        except (ValueError, KeyError, TypeError, IndexError) as exn:
            return skip_item(row["key"], f"bad annotation ({type(exn).__name__}: {exn})")
        return item

    def extras(self, row: Row, size: tuple) -> Dict[str, Any]:
        """Extra item fields from a row and the original image size ``(W, H)`` (none here)."""
        return {}
