"""Map-style image-caption tables: Conceptual Captions TSV, ``caption,file_path`` CSV, Flickr8k JSON,
class folders with a prompt template — one source class per format (:class:`TsvDataset`,
:class:`CsvDataset`, :class:`Flickr8kDataset`, :class:`FolderDataset`), each constructed from YAML with
its own arguments plus the shared ``selection`` options (:class:`~clipib.data.sources.rows.Selection`).
One class per format rather than one class with a reader per format: the formats take different
arguments (a TSV header flag, Flickr8k's caption choice, the folders' prompt and synonyms), and one class
would have to take all of them.

Each reader returns *rows*: ``{"key": str, "image": path, "caption": str}`` (Flickr8k rows carry
``"candidates": [5 captions]`` until :func:`clipib.data.selection.choose_best_captions` picks one).
A row that cannot be used (missing image file, empty caption, malformed line) keeps its place with
``"skip": reason`` so it is reported exactly once through the batches (see :mod:`clipib.data.common`).
Keys are stable: the row index in the file (TSV, CSV), the image name (Flickr8k), the image path
relative to the root (folders). The sources turn rows into items (:class:`~clipib.data.sources.rows.RowSource`).
YAML::

    dataset:
      class_path: clipib.data.sources.tables.TsvDataset
      init_args: {path: /data/cc/val.tsv, image_root: /data/cc/images, selection: {sample: 2000, sample_seed: 0}}
"""

from __future__ import annotations

import csv
import json
import os
from pathlib import Path
from typing import Callable, Dict, List, Literal, Mapping, Optional, Union
from urllib.parse import unquote, urlparse

from clipib.data.common import Row
from clipib.data.selection import choose_best_captions
from clipib.data.sources.rows import RowSource, Selection

PathLike = Union[str, os.PathLike]
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".gif", ".tif", ".tiff")


def image_row(key: str, image: Path, caption: Optional[str]) -> Row:
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
        rows.append(image_row(str(i), resolve_image(fields[1].strip(), root), fields[0]))
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
        return [image_row(str(i), resolve_image(r["file_path"] or "", root), r["caption"]) for i, r in enumerate(reader)]


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
        row = image_row(key, resolve_image(name, root), caps[0] if caps else "")
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
            rows.append(image_row(str(image.relative_to(root)), image, caption))
    return rows


class TsvDataset(RowSource):
    """Conceptual Captions TSV (``caption<TAB>url_or_path``, :func:`read_tsv`).

    Args:
        path: the TSV file.
        image_root: folder the image references resolve against (default: the TSV's folder).
        header: the first line is a header.
        selection: which rows are evaluated (:class:`~clipib.data.sources.rows.Selection`).
    """

    def __init__(self, path: str, image_root: Optional[str] = None, header: bool = False,
                 selection: Optional[Selection] = None) -> None:
        super().__init__(selection)
        self.path, self.image_root, self.header = path, image_root, header

    def read_rows(self) -> List[Row]:
        """Rows of the TSV (key: line index)."""
        return read_tsv(self.path, self.image_root, header=self.header)


class CsvDataset(RowSource):
    """NIB-style ``caption,file_path`` CSV with a header (:func:`read_csv`).

    Args:
        path: the CSV file.
        image_root: folder ``file_path`` is relative to (default: the CSV's folder).
        selection: which rows are evaluated.
    """

    def __init__(self, path: str, image_root: Optional[str] = None, selection: Optional[Selection] = None) -> None:
        super().__init__(selection)
        self.path, self.image_root = path, image_root

    def read_rows(self) -> List[Row]:
        """Rows of the CSV (key: row index)."""
        return read_csv(self.path, self.image_root)


NIB_BATCH = 32
"""NIB's Flickr8k batch size (its ``generate_attributions.py``: ``BS = 32``, unshuffled)."""
CAPTION_CHOICES = ("own", "nib_code", "best")


class Flickr8kDataset(RowSource):
    """Flickr8k ``en_val.json`` (:func:`read_flickr8k`): one row per image, one of its 5 captions.

    Args:
        path: ``en_val.json``.
        image_root: image folder (default: the JSON's folder).
        caption_choice: which caption a row keeps (needs the model's scorer unless an index):

            * ``"own"`` (default): the caption most similar to the row's own image - NIB's stated protocol
              (Sec. 5.1: the most similar of the 5 captions), done as stated. ``"best"`` is the same rule.
            * ``"nib_code"``: the rule NIB's published Flickr8k rows came from (REFERENCE_NOTES §8): its code
              scores every row's captions against the *first image of the row's batch* of 32 consecutive rows
              of ``en_val.json`` (unshuffled), not against the row's own image. Batches are counted over the
              whole file, as NIB ran it, whatever rows ``selection`` keeps; a row whose batch's first image
              cannot be scored becomes a skip. Use it only to reproduce NIB Table 2's Flickr8k rows.
            * an index: caption ``i`` of each row.
        selection: which rows are evaluated (the caption is chosen after ``sample``).
    """

    def __init__(self, path: str, image_root: Optional[str] = None,
                 caption_choice: Union[Literal["own", "nib_code", "best"], int] = "own",
                 selection: Optional[Selection] = None) -> None:
        super().__init__(selection)
        if not isinstance(caption_choice, int) and caption_choice not in CAPTION_CHOICES:
            raise ValueError(f"caption_choice must be one of {CAPTION_CHOICES} or an index, got {caption_choice!r}")
        self.path, self.image_root, self.caption_choice = path, image_root, caption_choice

    def read_rows(self) -> List[Row]:
        """Rows with all captions as ``"candidates"`` (key: image name) and, for ``"nib_code"``, the image
        NIB's code compared them with (``"nib_reference"``: the first image of the row's batch of 32)."""
        rows = read_flickr8k(self.path, self.image_root)
        if self.caption_choice == "nib_code":
            for i, row in enumerate(rows):
                row["nib_reference"] = rows[i - i % NIB_BATCH]["image"]
        return rows

    def choose(self, rows: List[Row]) -> List[Row]:
        """Pick each row's caption by ``caption_choice`` (class docstring)."""
        if self.caption_choice in ("own", "best"):
            return choose_best_captions(rows, self.scores(rows))
        if self.caption_choice == "nib_code":
            return choose_nib_code_captions(rows, self.scores)
        return [pick_caption(r, int(self.caption_choice)) for r in rows]


def choose_nib_code_captions(rows: List[Row], scores: Callable[[List[Row]], List[Optional[List[float]]]]) -> List[Row]:
    """NIB's published Flickr8k rule: each row keeps the candidate most similar to its ``"nib_reference"``
    image (the first image of its batch), first on ties; the row's own image is the one evaluated."""
    probes = [row if "skip" in row else {**row, "image": row["nib_reference"]} for row in rows]
    chosen = choose_best_captions(probes, scores(probes))
    out: List[Row] = []
    for row, pick in zip(rows, chosen):
        if "skip" in pick and "skip" not in row:
            out.append({**row, "skip": "nib_code: the first image of its batch could not be scored"})
        else:
            out.append({**pick, "image": row["image"]})
    return out


class FolderDataset(RowSource):
    """Class folders captioned with a prompt (:func:`read_folders`; ImageNet / Tiny-ImageNet).

    Args:
        root: folder of class folders (or of images, with ``annotations``).
        prompt: caption template, ``{}`` = the class name (or its synonym).
        per_class: keep the first N images per class by file name.
        synonyms: class -> text, a mapping or a ``words.txt``-style file.
        annotations: ``name<TAB>class`` file for images in ``root/images`` (Tiny-ImageNet val).
        selection: which rows are evaluated.
    """

    def __init__(self, root: str, prompt: str = "a photo of a {}", per_class: Optional[int] = None,
                 synonyms: Union[None, str, Dict[str, str]] = None, annotations: Optional[str] = None,
                 selection: Optional[Selection] = None) -> None:
        super().__init__(selection)
        self.root, self.prompt, self.per_class = root, prompt, per_class
        self.synonyms, self.annotations = synonyms, annotations

    def read_rows(self) -> List[Row]:
        """Rows by class, then file name (key: path relative to ``root``)."""
        return read_folders(self.root, self.prompt, self.per_class, self.synonyms, self.annotations)


def pick_caption(row: Row, index: int) -> Row:
    """Flickr8k row with caption ``index`` of its candidates (a skip when it has fewer)."""
    candidates = row.get("candidates", [])
    if "skip" in row:
        return row
    if not -len(candidates) <= index < len(candidates):
        return {**row, "skip": f"no caption #{index}"}
    return {**row, "caption": candidates[index]}
