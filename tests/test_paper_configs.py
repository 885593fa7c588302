"""Every configs/paper/*.yaml runs one step of eval.py on generated stand-in data in the layout it expects.

The stand-in data is written once, under a temporary folder that replaces the configs' ``/path/to/`` prefix, so
each config reads exactly the file names and formats it names (TSV + image folder, NIB's CSV, Tiny-ImageNet's
val layout, Flickr8k's en_val.json, webdataset shards, RefCOCOg / MS-CXR JSON lines with boxes and masks).
What the test overrides, and only that: the tiny random-weight model for ViT-B/32, one run seed, a sample of
two pairs (a third of six for a partition; doubled by ``mismatched: both``) in one batch, no TensorBoard or
gallery, and each method's cost knobs (steps, copies, mask and sample counts; a layer beyond the tiny model's 3
blocks becomes 3). A first check names any option a config sets that nothing offers (tests/paper_needs.py).
"""
from __future__ import annotations

import inspect
import io
import json
import re
from pathlib import Path
from typing import Any, Callable, Dict

import numpy as np
import pytest
import webdataset as wds
import yaml
from PIL import Image

import clipib
from clipib.callbacks.records import read_records
from tests.paper_needs import missing_options

ROOT = Path(__file__).resolve().parent.parent
TINY = str(ROOT / "tests" / "data" / "tiny-clip.json")
CONFIGS = sorted((ROOT / "configs" / "paper").glob("*.yaml"))
PLACEHOLDER = "/path/to/"
N_ROWS = 6
CAPTIONS = ["a red circle on a table", "two dogs in the snow", "a man riding a bike", "a bowl of fruit",
            "a city street at night", "a small boat on a lake"]
SHRINK = {"steps": 1, "copies": 1, "n_masks": 4, "text_masks": 4, "n_samples": 8, "mlp_warmup": 1}
TINY_DEPTH = 3


def _image(path: Path, seed: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = (np.random.default_rng(seed).random((40, 48, 3)) * 255).astype(np.uint8)
    Image.fromarray(pixels).save(path, format="JPEG" if path.suffix.lower() in (".jpg", ".jpeg") else "PNG")


def _tsv(args: Dict[str, Any]) -> None:
    path, root = Path(args["path"]), Path(args["image_root"])
    for i in range(N_ROWS):
        _image(root / f"img{i}.jpg", i)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(f"{c}\thttps://example.com/pics/img{i}.jpg\n" for i, c in enumerate(CAPTIONS)))


def _csv(args: Dict[str, Any]) -> None:
    path = Path(args["path"])
    for i in range(N_ROWS):
        _image(path.parent / "images" / f"{i}.png", i)
    path.write_text("caption,file_path\n" + "".join(f"{c},images/{i}.png\n" for i, c in enumerate(CAPTIONS)))


def _folders(args: Dict[str, Any]) -> None:
    root, annotations, synonyms = Path(args["root"]), Path(args["annotations"]), Path(args["synonyms"])
    lines = []
    for i in range(N_ROWS):
        _image(root / "images" / f"val_{i}.JPEG", i)
        lines.append(f"val_{i}.JPEG\tn0{i % 2}\t0\t0\t10\t10\n")  # two classes, three images each
    annotations.write_text("".join(lines))
    synonyms.write_text("n00\tgoldfish, Carassius auratus\nn01\ttabby, tabby cat\n")


def _flickr8k(args: Dict[str, Any]) -> None:
    path, root = Path(args["path"]), Path(args["image_root"])
    entries = []
    for i in range(N_ROWS):
        _image(root / f"{1000 + i}_flickr.jpg", i)
        captions = [CAPTIONS[(i + k) % N_ROWS] for k in range(5)]
        entries.append({"image": f"{1000 + i}_flickr.jpg", "caption": captions})
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(entries))


def _shards(args: Dict[str, Any]) -> None:
    for shard in range(2):
        path = Path(args["shards"].replace("{00000..00001}", f"{shard:05d}"))
        path.parent.mkdir(parents=True, exist_ok=True)
        with wds.TarWriter(str(path)) as sink:
            for i in range(N_ROWS // 2):
                j = shard * (N_ROWS // 2) + i
                buf = io.BytesIO()
                Image.fromarray((np.random.default_rng(j).random((40, 48, 3)) * 255).astype(np.uint8)).save(buf, "JPEG")
                sink.write({"__key__": f"{j:09d}", "jpg": buf.getvalue(), "txt": CAPTIONS[j]})


def _grounding(args: Dict[str, Any]) -> None:
    """RefCOCOg-style lines; every other line also has a mask (two rectangles as polygons, MS-CXR's layout)."""
    path, root = Path(args["path"]), Path(args["image_root"])
    lines = []
    for i in range(N_ROWS):
        _image(root / f"COCO_train2014_{i:012d}.jpg", i)
        line = {"image": f"COCO_train2014_{i:012d}.jpg", "expression": CAPTIONS[i], "box": [4, 6, 20, 16]}
        if i % 2:
            line["mask"] = [[4, 6, 24, 6, 24, 22, 4, 22], [30, 2, 40, 2, 40, 10, 30, 10]]
        lines.append(json.dumps(line))
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n")


WRITERS: Dict[str, Callable[[Dict[str, Any]], None]] = {
    "clipib.data.sources.tables.TsvDataset": _tsv,
    "clipib.data.sources.tables.CsvDataset": _csv,
    "clipib.data.sources.tables.FolderDataset": _folders,
    "clipib.data.sources.tables.Flickr8kDataset": _flickr8k,
    "clipib.data.sources.webdataset.ShardDataset": _shards,
    "clipib.data.sources.refcoco.RefCocoDataset": _grounding,
}


def _relocate(value: Any, root: Path) -> Any:
    """Every ``/path/to/`` string under ``root``; a shard brace range cut to the two stand-in shards."""
    if isinstance(value, dict):
        return {k: _relocate(v, root) for k, v in value.items()}
    if isinstance(value, list):
        return [_relocate(v, root) for v in value]
    if isinstance(value, str) and value.startswith(PLACEHOLDER):
        return re.sub(r"\{\d+\.\.\d+\}", "{00000..00001}", f"{root}/{value[len(PLACEHOLDER):]}")
    return value


def _shrunk(methods: Dict[str, Any]) -> Dict[str, Any]:
    """Each method with its cost knobs at their minimum and its layer inside the tiny model."""
    out = {}
    for name, spec in methods.items():
        spec = dict(spec or {})
        params = inspect.signature(clipib.METHODS[spec.get("method", name)].__init__).parameters
        spec.update({k: v for k, v in SHRINK.items() if k in params})
        if isinstance(spec.get("layer"), int):
            spec["layer"] = min(spec["layer"], TINY_DEPTH)
        out[name] = spec
    return out


@pytest.fixture(scope="module")
def standin(tmp_path_factory) -> Path:
    """The stand-in root; datasets are written on first use (one per distinct placeholder layout)."""
    return tmp_path_factory.mktemp("paper_data")


_written: set = set()


@pytest.mark.parametrize("config", CONFIGS, ids=[c.stem for c in CONFIGS])
def test_paper_config_sets_only_offered_options(config: Path) -> None:
    """Method specs are plain dicts: a misspelt option (or an unknown caption rule) fails here, named."""
    assert missing_options(config) == []


@pytest.mark.parametrize("config", CONFIGS, ids=[c.stem for c in CONFIGS])
@pytest.mark.filterwarnings("ignore::UserWarning")
def test_paper_config_runs_one_step(config: Path, standin: Path, tmp_path: Path) -> None:
    from clipib.lit.cli import eval_cli

    cfg = yaml.safe_load(config.read_text())
    dataset = _relocate(cfg["data"]["init_args"]["dataset"], standin)
    key = json.dumps(dataset, sort_keys=True)
    if key not in _written:
        WRITERS[dataset["class_path"]](dataset["init_args"])
        _written.add(key)
    if "manifest" in dataset["init_args"]:  # the shard selection's first pass writes here
        dataset["init_args"]["manifest"] = str(tmp_path / "manifest")
    selection = dataset["init_args"].setdefault("selection", {})
    selection["sample"] = N_ROWS if selection.get("partition") else 2  # a third of 6 rows, or 2 (4 when doubled)
    cfg["data"]["init_args"].update(dataset=dataset, batch_size=8, num_workers=0)  # all of them: one step
    cfg["model"].update(model=TINY, pretrained="none", seeds=cfg["model"]["seeds"][:1],
                        methods=_shrunk(cfg["model"]["methods"]))
    cfg["trainer"].update(default_root_dir=str(tmp_path / "run"), accelerator="cpu", devices=1,
                          enable_progress_bar=False, logger=False, callbacks=[])  # no TensorBoard, no gallery
    path = tmp_path / "config.json"
    path.write_text(json.dumps(cfg))
    eval_cli(args=["test", "-c", str(path)])

    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert set(cfg["model"]["methods"]) <= set(summary), config.name
    for method in cfg["model"]["methods"]:
        values = summary[method]
        want = 4 if selection.get("mismatched") == "both" else 2
        assert values["pairs_per_s"]["n"] == want, (method, values)
        for metric in cfg["model"].get("metrics") or {}:
            expected = {"confidence": "image_drop", "localization": "iou", "pointing_game": "pg_iou",
                        "mismatch_scalars": "image_entropy", "retrieval_roar": "roar_i2t_oc"}[metric]
            assert expected in values, (config.name, method, metric)
    if cfg["model"].get("mismatch_auroc"):  # App. C: every record carries the clean-cosine baseline's value
        records = read_records(tmp_path / "run")
        assert records and all(isinstance(r.get("clip_cos"), float) for r in records)
