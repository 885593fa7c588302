"""ROAR retrain jobs (issue 13): the degraded data, ``train.py fit -c configs/roar/...`` writing its score,
DDP and resume giving the same run, and (slow) the score ordering oracle > IB method > random on the shapes world.

Tiny runs: the tiny random-weight CLIP of tests/data, 40 shapes pairs, maps generated into a store written in
the RecordWriter's format (records + webdataset tar).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import webdataset as wds
import yaml
from lightning.pytorch import Callback

from clipib.callbacks.records import index_store, iter_attributions, read_map, store_id
from clipib.data.sources import ModelTransforms, ShapesDataset
from clipib.lit.cli import train_cli
from clipib.removal import remove_image, top_fraction_mask
from clipib.roar import DegradedDataset, MissingMapError

ROOT = Path(__file__).resolve().parent.parent
TINY = str(ROOT / "tests" / "data" / "tiny-clip.json")
BASE = ROOT / "configs" / "roar" / "shapes.yaml"
N = 40  # pairs: 32 train, 8 val


def _shapes(n: int = N) -> ShapesDataset:
    return ShapesDataset(n, seed=11, split="roar")


def write_store(run: Path, keys: list, method: str, seed: int = 0, image_size=(32, 32), ctx: int = 77,
                attempt: int = 0, image_map: np.ndarray | None = None) -> dict:
    """A store in RecordWriter's format with a reproducible random map per key (or ``image_map`` for every key);
    returns ``{key: (image, text)}``."""
    (run / "records").mkdir(parents=True, exist_ok=True)
    (run / "attributions").mkdir(parents=True, exist_ok=True)
    name = f"rank0-{attempt:03d}"
    maps = {}
    with wds.TarWriter(str(run / "attributions" / f"{name}.tar")) as tar, \
            open(run / "records" / f"{name}.jsonl", "a") as records:
        for i, key in enumerate(keys):
            g = torch.Generator().manual_seed(1000 * attempt + i)
            image, text = torch.rand(image_size, generator=g).numpy(), torch.rand(ctx, generator=g).numpy()
            image = image if image_map is None else image_map
            maps[key] = (image.astype(np.float16), text.astype(np.float16))
            tar.write({"__key__": store_id(method, seed, key), "json": {"key": key, "method": method, "seed": seed},
                       "image.npy": maps[key][0], "text.npy": maps[key][1]})
            records.write(json.dumps({"key": key, "method": method, "seed": seed, "x": 1.0}) + "\n")
    return maps


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> Path:
    """Maps of two methods (``random_a``, ``random_b``) for the 40 tiny pairs."""
    run = tmp_path_factory.mktemp("maps")
    keys = [_shapes().key(i) for i in range(N)]
    write_store(run, keys, "random_a")
    write_store(run, keys, "random_b", attempt=1)
    return run


def test_index_reads_what_the_store_holds(store: Path) -> None:
    """The key index reads the same arrays as the streaming reader, for the asked method only."""
    index = index_store(store, "random_a")
    streamed = {s["key"]: s for s in iter_attributions(store) if s["method"] == "random_a"}
    assert set(index) == set(streamed) and len(index) == N
    for key in list(index)[:5]:
        np.testing.assert_array_equal(read_map(index[key]["image"]), streamed[key]["image"])
        np.testing.assert_array_equal(read_map(index[key]["text"]), streamed[key]["text"])
    assert index_store(store, "random_a", seed=1) == {}
    with pytest.raises(FileNotFoundError, match="no attribution store"):
        index_store(store / "nothing", "random_a")


def test_degraded_items_use_their_own_map(store: Path, tiny_clip) -> None:
    """Each item loses exactly the pixels above the 75th percentile of its own map (channel mean) and the content
    tokens above the median (pad id 0); a key without a map is an error naming it."""
    source = _shapes()
    source.use_transforms(ModelTransforms.from_clip(tiny_clip))
    index = index_store(store, "random_a")
    data = DegradedDataset(source, index, modality="both")
    for i in (0, 7):
        clean, item = source[i], data[i]
        own = torch.from_numpy(read_map(index[clean["key"]]["image"])).float()[None]
        gone = top_fraction_mask(own, 0.25)[0]  # no ties in a random map
        changed = (item["image"] != clean["image"]).any(0)
        assert torch.equal(changed, gone & changed) and changed.sum() >= 0.9 * gone.sum()
        mean = clean["image"].mean((1, 2))
        torch.testing.assert_close(item["image"][:, gone], mean[:, None].expand(-1, int(gone.sum())))
        n = int(clean["ids"].argmax()) - 1  # content tokens: SOT .. EOT exclusive
        blanked = item["ids"] != clean["ids"]
        assert int(blanked.sum()) == n - 1 - (n - 1) // 2 and (item["ids"][blanked] == 0).all()  # above the median
        assert not blanked[0] and not blanked[n + 1]
    partial = DegradedDataset(source, {k: v for k, v in index.items() if k != source.key(3)})
    partial[2]
    with pytest.raises(MissingMapError, match=source.key(3)):
        partial[3]


def test_road_noise_is_independent_of_the_tie_break(tmp_path: Path, tiny_clip) -> None:
    """``fill: road`` on a binary (ground-truth-like) map: the noise on the removed background pixels, which the
    tie-break map picked, has mean 0 like the object's (it once was the tie-break map itself: positive mean)."""
    square = np.zeros((32, 32), np.float32)
    square[8:16, 8:16] = 1.0  # the "object": 64 of 1,024 pixels
    source = _shapes(4)
    source.use_transforms(ModelTransforms.from_clip(tiny_clip))
    write_store(tmp_path, [source.key(i) for i in range(4)], "gt", image_map=square)
    data = DegradedDataset(source, index_store(tmp_path, "gt"), fraction=0.5, fill="road")
    noise = []
    for i in range(4):
        key, clean = source.key(i), source[i]["image"]
        gone = top_fraction_mask(torch.from_numpy(square)[None], 0.5, tiebreak=data._ties(key, (32, 32)))
        assert int(gone.sum()) == 512 and bool(gone[0, 8:16, 8:16].all())
        plain = remove_image(clean[None], gone, "road", noise=0.0)[0]  # the imputation without noise
        noise.append((data[i]["image"] - plain)[:, gone[0] & (torch.from_numpy(square) == 0)])  # [3, 448]
    noise = torch.cat(noise, 1)  # 4 x 448 background pixels, ROAD's std 0.01
    assert noise.std().item() == pytest.approx(0.01, rel=0.1)
    assert noise.mean(1).abs().max().item() < 5 * 0.01 / noise.shape[1] ** 0.5, noise.mean(1)


@pytest.mark.filterwarnings("ignore:LightningCLI's args parameter")
def test_roar_configs_parse(capsys) -> None:
    """configs/roar: the run config parses against train.py, the maps config against eval.py."""
    from clipib.lit.cli import eval_cli

    for cli, args in ((train_cli, ["fit", "-c", str(BASE)]),
                      (eval_cli, ["test", "-c", str(ROOT / "configs" / "roar" / "shapes_maps.yaml")])):
        with pytest.raises(SystemExit) as exit_info:
            cli(args=[*args, "--print_config"])
        assert exit_info.value.code in (0, None)
    printed = capsys.readouterr().out
    assert "clipib.roar.RoarDataModule" in printed and "oracle: {}" in printed


# ------------------------------------------------------------------------------------------- train.py fit

def _config(tmp: Path, store: Path, name: str, **data) -> Path:
    """The shipped ROAR config overridden to a tiny model, 40 pairs, 2 epochs of 4 steps."""
    override = {
        "trainer": {"max_epochs": 2, "enable_model_summary": False, "enable_progress_bar": False,
                    "log_every_n_steps": 1, "default_root_dir": str(tmp / name)},
        "model": {"init_args": {"model": TINY, "pretrained": None, "lr": 1e-3, "warmup_steps": 1, "val_group": 4}},
        "data": {"init_args": {"dataset": {"init_args": {"size": N, "seed": 11, "split": "roar"}},
                               "maps": str(store), "batch_size": 8, "eval_batch_size": 3, **data}},
    }
    path = tmp / f"{name}.yaml"
    path.write_text(yaml.safe_dump(override))
    return path


def _fit(*configs: Path, extra: tuple = ()) -> None:
    torch.set_num_threads(1)
    train_cli(["fit", "-c", str(BASE), *[a for c in configs for a in ("-c", str(c))], *extra])


def _weights(run: Path) -> dict:
    return torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)["state_dict"]


class Interrupt(Callback):
    """Stops a fit with a KeyboardInterrupt (what Ctrl-C or a pre-empted job raises) at ``step``."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step == self.step:
            raise KeyboardInterrupt


@pytest.fixture(scope="module")
def runs(tmp_path_factory, store: Path) -> Path:
    """A reference run and a degraded run (``random_a``) of the tiny recipe."""
    tmp = tmp_path_factory.mktemp("roar")
    _fit(_config(tmp, store, "ref", method=None))
    _fit(_config(tmp, store, "deg", method="random_a"), extra=("--model.init_args.reference", str(tmp / "ref")))
    return tmp


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_fit_writes_its_score(runs: Path) -> None:
    """``train.py fit -c configs/roar/...`` writes roar.json with (L_c - L_o) / L_o, an eval-shaped summary.json,
    the resolved config and a last checkpoint."""
    ref = json.loads((runs / "ref" / "roar.json").read_text())
    deg = json.loads((runs / "deg" / "roar.json").read_text())
    assert ref["method"] is None and "score" not in ref and ref["val_pairs"] == 8 and ref["steps"] == 8
    assert deg["method"] == "random_a" and deg["quantile"] == 0.75 and deg["train_pairs"] == 32
    assert deg["reference_loss"] == ref["val_loss"]
    assert deg["score"] == pytest.approx((deg["val_loss"] - ref["val_loss"]) / ref["val_loss"])
    assert deg["val_loss"] != ref["val_loss"]  # the degraded pairs trained another model
    summary = json.loads((runs / "deg" / "summary.json").read_text())
    assert summary["random_a"]["roar_plus_image"] == {"mean": deg["score"], "std": 0.0, "n": 1}
    assert (runs / "deg" / "config.yaml").is_file() and (runs / "deg" / "checkpoints" / "last.ckpt").is_file()
    assert list((runs / "deg").rglob("events.out.tfevents.*"))


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_resume_gives_the_uninterrupted_weights(runs: Path, store: Path, tmp_path: Path) -> None:
    """A fit interrupted in its second epoch and resumed with ``--ckpt_path last`` ends with the uninterrupted
    run's weights and score."""
    cfg = _config(tmp_path, store, "deg", method="random_a")
    stop = tmp_path / "stop.yaml"
    stop.write_text(yaml.safe_dump({"trainer": {"callbacks": [
        {"class_path": f"{Interrupt.__module__}.Interrupt", "init_args": {"step": 6}}]}}))
    ref = ("--model.init_args.reference", str(runs / "ref"))
    try:
        _fit(cfg, stop, extra=ref)
    except SystemExit:
        pass
    assert not (tmp_path / "deg" / "roar.json").exists()  # interrupted: no result
    assert torch.load(tmp_path / "deg" / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 4
    _fit(cfg, extra=(*ref, "--ckpt_path", "last"))
    resumed, straight = _weights(tmp_path / "deg"), _weights(runs / "deg")
    assert resumed.keys() == straight.keys()
    for key in straight:
        torch.testing.assert_close(resumed[key], straight[key], atol=0, rtol=0)
    again = json.loads((tmp_path / "deg" / "roar.json").read_text())
    assert again["score"] == json.loads((runs / "deg" / "roar.json").read_text())["score"]


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_ddp_gives_the_same_score(runs: Path, store: Path, tmp_path: Path) -> None:
    """Two CPU processes (gloo) with the same global batch: the same validation loss and score as one."""
    cfg = _config(tmp_path, store, "ddp", method="random_a")
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, str(ROOT / "train.py"), "fit", "-c", str(BASE), "-c",
                           str(ROOT / "configs" / "trainer" / "ddp_cpu.yaml"), "-c", str(cfg),
                           "--model.init_args.reference", str(runs / "ref")],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ddp = json.loads((tmp_path / "ddp" / "roar.json").read_text())
    one = json.loads((runs / "deg" / "roar.json").read_text())
    assert ddp["steps"] == one["steps"] and ddp["val_pairs"] == one["val_pairs"]
    assert ddp["val_loss"] == pytest.approx(one["val_loss"], rel=1e-4)
    assert ddp["score"] == pytest.approx(one["score"], rel=1e-3, abs=1e-5)


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_two_process_sweep_writes_each_point_once_and_resumes(runs: Path, store: Path, tmp_path: Path) -> None:
    """``clipib roar`` with the DDP trainer block: Lightning's launcher re-runs the sweep command in a second
    process, both walk the grid, rank 0 alone writes each point's roar.json and the sweep's summary (printed
    once); the scores are the single-process runs'; a second sweep on the same folder reruns nothing."""
    from clipib.roar.sweep import run_sweep

    cfg = _config(tmp_path, store, "unused", method=None)
    out = tmp_path / "sweep"
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "clipib", "roar", "-c", str(BASE), "-c", str(cfg), "-c",
                           str(ROOT / "configs" / "trainer" / "ddp_cpu.yaml"), "--out", str(out), "--maps", str(store),
                           "--methods", "random_a", "--repeats", "1"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("ROAR run finished") == 2 and proc.stdout.count("| method |") == 1, proc.stdout
    points = {"reference": (out / "reference" / "r0", runs / "ref"), "random_a": (out / "random_a" / "fdefault" / "r0",
                                                                                    runs / "deg")}
    for two, one in points.values():
        a, b = json.loads((two / "roar.json").read_text()), json.loads((one / "roar.json").read_text())
        assert a["steps"] == b["steps"] and a["val_loss"] == pytest.approx(b["val_loss"], rel=1e-4)
        assert a.get("score", 0.0) == pytest.approx(b.get("score", 0.0), rel=1e-3, abs=1e-5)
    written = {name: (two / "roar.json").stat().st_mtime_ns for name, (two, _) in points.items()}
    summary = json.loads((out / "summary.json").read_text())
    assert summary["random_a"]["roar_plus_image"]["n"] == 1
    again = run_sweep([str(BASE), str(cfg)], out, ["random_a"], repeats=1, maps=store)  # resumed: nothing to run
    assert {name: (two / "roar.json").stat().st_mtime_ns for name, (two, _) in points.items()} == written
    assert again["random_a"] == summary["random_a"]


def test_multi_process_sweep_refuses_to_make_maps(tmp_path: Path, monkeypatch, capsys) -> None:
    """Under torchrun every process would write the one attribution store: missing maps are one line, exit 2."""
    from clipib.cli import main

    monkeypatch.setenv("WORLD_SIZE", "2")
    code = main(["roar", "-c", str(BASE), "--out", str(tmp_path / "sweep"), "--methods", "oracle",
                 "--maps-config", str(ROOT / "configs" / "roar" / "shapes_maps.yaml")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and "make them before a multi-process sweep" in err, err
    assert not (tmp_path / "sweep" / "maps").exists()


# ------------------------------------------------------------------------------- shapes: the ordering

@pytest.mark.slow
@pytest.mark.filterwarnings("ignore::UserWarning")
def test_shapes_oracle_degrades_most_random_least(tmp_path: Path) -> None:
    """Acceptance (issue 13): on the shipped clipib-shapes CLIP and held-out shapes pairs, removing the top quarter
    of pixels by the ground truth (``oracle``) raises the validation loss of ROAR+ fine-tuning far more than
    removing a random quarter, and M2IB lies between them (one small run: 240 pairs, 2 epochs of 3 steps; the
    sweep in docs/benchmarks.md shows the whole curve)."""
    from clipib.roar.sweep import run_sweep

    maps = tmp_path / "maps"
    data = ["--data.dataset.init_args.size", "240", "--data.dataset.init_args.seed", "7",
            "--data.dataset.init_args.split", "roar"]
    make = ["test", "-c", str(ROOT / "configs" / "roar" / "shapes_maps.yaml"), "--trainer.default_root_dir",
            str(maps), "--model.modality", "image", "--model.methods", '{"oracle": {}, "random": {}, "m2ib": {}}',
            "--trainer.enable_progress_bar", "false", *data]
    torch.set_num_threads(1)
    from clipib.lit.cli import eval_cli

    eval_cli(args=make)
    extra = ["--trainer.enable_progress_bar", "false", "--data.init_args.dataset.init_args.size", "240",
             "--model.init_args.val_group", "48"]
    summary = run_sweep([str(BASE)], tmp_path / "sweep", ["oracle", "random", "m2ib"], repeats=1, maps=maps,
                        extra=extra)
    score = {m: summary[m]["roar_plus_image"]["mean"] for m in ("oracle", "random", "m2ib")}
    assert score["oracle"] > score["m2ib"] > score["random"], score
    assert score["oracle"] > 2 * max(score["random"], 0.01), score
    assert json.loads((tmp_path / "sweep" / "summary.json").read_text())["protocol"] == "roar_plus"


def test_curve_outputs_with_repeats(tmp_path):
    """Several fractions: curve.png (± std bars when repeats > 1), curve.json and TensorBoard scalars per method."""
    from PIL import Image

    from clipib.roar.sweep import write_outputs
    from clipib.viz import curve_figure

    fractions = [0.1, 0.5, 0.9]
    summary = {m: {f"roar_image@{f:g}": {"mean": base + f / 10, "std": 0.02, "sem": 0.014, "n": 2} for f in fractions}
               for m, base in (("oracle", 0.2), ("random", 0.0))}
    write_outputs(tmp_path, summary, ["oracle", "random"], fractions)
    saved = json.loads((tmp_path / "curve.json").read_text())
    assert saved["fractions"] == fractions and saved["scores"]["oracle"] == pytest.approx([0.21, 0.25, 0.29])
    assert Image.open(tmp_path / "curve.png").size == (640, 400)
    assert sorted(p.name for p in (tmp_path / "tensorboard").iterdir()) == ["oracle", "random"]
    curves = {"a": [0.2, 0.25, 0.3]}
    plain = np.asarray(curve_figure(fractions, curves, y_range=(0.0, 0.4)))
    bars = np.asarray(curve_figure(fractions, curves, y_range=(0.0, 0.4), errors={"a": [0.05, 0.05, 0.05]}))
    assert (plain != bars).any(axis=2).sum() > 3 * 10  # three bars of ~25 px each
