"""Contrastive pre-training: the real train.py CLI, reproducibility, export, and the shipped model."""

from __future__ import annotations

import csv
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import clipib
import yaml
from safetensors.torch import load_file

from clipib.data.sources import ModelTransforms, ShapesDataset
from clipib.lit.pretrain_module import ContrastivePretrainModule, build_model, group_retrieval_top1
from clipib.models.loading import SHIPPED_MODELS

MODEL_CONFIG_DIR, ASSET_DIR = (p.parent for p in SHIPPED_MODELS["clipib-shapes"])

ROOT = Path(__file__).resolve().parent.parent
RECIPE = ROOT / "configs" / "train" / "shapes_clip.yaml"
TINY_MODEL = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 64, "patch_size": 16, "layers": 1, "width": 32, "head_width": 16},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
}


def _tiny_run_config(tmp: Path, seed: int = 0) -> Path:
    """The shipped recipe overridden to a 3-step run of a tiny model on tiny data, logging every step."""
    model_json = tmp / "clipib-test-tiny.json"
    model_json.write_text(json.dumps(TINY_MODEL))
    override = {
        "seed_everything": seed,
        "trainer": {"max_steps": 3, "val_check_interval": 3, "log_every_n_steps": 1,
                    "enable_progress_bar": False, "enable_model_summary": False,
                    "default_root_dir": str(tmp / f"run{seed}"),
                    "logger": {"class_path": "lightning.pytorch.loggers.CSVLogger",
                               "init_args": {"save_dir": str(tmp / f"logs{seed}")}},
                    "callbacks": [{"class_path": "clipib.callbacks.safetensors_export.HalfSafetensorsExport",
                                   "init_args": {"path": str(tmp / f"w{seed}.safetensors")}}]},
        "model": {"init_args": {"model_config": str(model_json), "warmup_steps": 1}},
        "data": {"init_args": {"train": {"init_args": {"size": 48}}, "val": {"init_args": {"size": 32}},
                               "test": {"init_args": {"size": 32}}, "batch_size": 16, "num_workers": 0}},
    }
    path = tmp / f"tiny{seed}.yaml"
    path.write_text(yaml.safe_dump(override))
    return path


def _losses(log_root: Path) -> list[float]:
    """train/loss per step from the CSVLogger's metrics.csv."""
    (metrics,) = log_root.rglob("metrics.csv")
    rows = list(csv.DictReader(metrics.open()))
    return [float(r["train/loss"]) for r in rows if r.get("train/loss")]


def _cli_in_process(args: list[str]) -> None:
    spec = importlib.util.spec_from_file_location("clipib_train_entry", ROOT / "train.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    module.main(args)


def test_train_cli_runs_exports_and_reproduces(tmp_path: Path) -> None:
    cfg = _tiny_run_config(tmp_path)
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, str(ROOT / "train.py"), "fit", "-c", str(RECIPE), "-c", str(cfg)],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    weights = tmp_path / "w0.safetensors"
    state = load_file(str(weights))
    assert all(v.dtype == torch.float16 for v in state.values() if v.is_floating_point())
    model = build_model(str(tmp_path / "clipib-test-tiny.json"), weights)  # strict load of open_clip keys
    assert set(state) == set(model.state_dict())
    # a later stage starts from these weights (configs/train/shapes_clip_anneal.yaml)
    stage2 = ContrastivePretrainModule(model_config=str(tmp_path / "clipib-test-tiny.json"), init_weights=str(weights))
    for key, value in stage2.model.state_dict().items():
        torch.testing.assert_close(value, model.state_dict()[key], atol=0, rtol=0)
    first = _losses(tmp_path / "logs0")
    assert len(first) == 3 and all(torch.isfinite(torch.tensor(first)))

    assert len(set(first)) == 3, "the loss moves: training steps happen"

    # the same config in another process -> the identical loss curve (seeded, deterministic, in-order data)
    torch.set_num_threads(1)
    _cli_in_process(["fit", "-c", str(RECIPE), "-c", str(cfg),
                     "--trainer.logger.init_args.save_dir", str(tmp_path / "again")])
    assert _losses(tmp_path / "again") == first


def test_trimmed_text_and_fixed_scale(tmp_path: Path) -> None:
    """Training embeds text on ids trimmed to the batch's longest caption: equal to open_clip's full-context
    forward. ``fixed_logit_scale`` holds the temperature (no gradient) and rejects values above 100."""
    model_json = tmp_path / "clipib-test-tiny.json"
    model_json.write_text(json.dumps(TINY_MODEL))
    torch.manual_seed(0)
    module = ContrastivePretrainModule(model_config=str(model_json), fixed_logit_scale=100.0)
    ids = clipib.load_clip(str(model_json), pretrained=None).tokenize(["a red circle", "look at the blue square"])
    images = torch.randn(2, 3, 64, 64)
    img, txt = module.embed(images, ids)
    out = module.model(images, ids)  # open_clip's own forward on all 77 positions
    torch.testing.assert_close(img, out["image_features"], atol=1e-6, rtol=0)
    torch.testing.assert_close(txt, out["text_features"], atol=1e-6, rtol=0)
    assert not module.model.logit_scale.requires_grad
    assert torch.isclose(module.model.logit_scale.exp(), torch.tensor(100.0))
    assert ContrastivePretrainModule(model_config=str(model_json)).model.logit_scale.requires_grad
    with pytest.raises(ValueError, match="fixed_logit_scale"):
        ContrastivePretrainModule(model_config=str(model_json), fixed_logit_scale=1000.0)


@pytest.mark.parametrize("name", ["shapes_clip", "shapes_clip_anneal", "shapes_clip_anneal2", "shapes_clip_anneal3"])
@pytest.mark.filterwarnings("ignore:LightningCLI's args parameter")
def test_train_configs_parse(name: str, capsys) -> None:
    """Every stage of the shipped model's recipe (the base, plus the stage's overlay) parses against the real
    train.py CLI (names and types); tests/test_configs.py checks the composed values."""
    stage = [] if name == "shapes_clip" else ["-c", str(ROOT / "configs" / "train" / f"{name}.yaml")]
    with pytest.raises(SystemExit) as exit_info:
        _cli_in_process(["fit", "-c", str(RECIPE), *stage, "--print_config"])
    assert exit_info.value.code in (0, None)
    printed = capsys.readouterr().out
    assert "fixed_logit_scale: 100.0" in printed and "minimal_pairs: true" in printed


def test_group_retrieval_counts_any_holder() -> None:
    img = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    txt = torch.tensor([[0.0, 1.0], [0.0, 1.0]])  # both captions closest to image 1
    present = torch.tensor([[True, False], [True, True]])  # image 1 holds both pairs
    t2i, i2t = group_retrieval_top1(img, txt, present, torch.tensor([0, 1]), group=2)
    assert t2i == 1.0 and i2t == 1.0
    present = torch.tensor([[True, False], [False, True]])
    t2i, i2t = group_retrieval_top1(img, txt, present, torch.tensor([0, 1]), group=2)
    assert t2i == 0.5 and i2t == 0.5
    with pytest.raises(ValueError):
        group_retrieval_top1(img, txt, present, torch.tensor([0, 1]), group=4)


@pytest.fixture(scope="module")
def shipped_retrieval() -> tuple:
    """Group-of-32 top-1 retrieval of the shipped model (loaded offline by ``clipib.load_clip``) on 1,024
    held-out pairs: ``(text->image, image->text)``."""
    splits = yaml.safe_load(RECIPE.read_text())["data"]["init_args"]
    test_seed = splits["test"]["init_args"]["seed"]
    assert test_seed not in (splits["train"]["init_args"]["seed"], splits["val"]["init_args"]["seed"])
    weights = ASSET_DIR / "clipib-shapes.safetensors"
    assert weights.stat().st_size <= 20 * 2**20
    clip = clipib.load_clip("clipib-shapes")
    reference = build_model(str(MODEL_CONFIG_DIR / "clipib-shapes.json"), weights).eval()
    ds = ShapesDataset(1024, seed=test_seed, split="test")
    ds.use_transforms(ModelTransforms.from_clip(clip))
    img, txt, present, pair = [], [], [], []
    with torch.inference_mode():
        for i, batch in enumerate(torch.utils.data.DataLoader(ds, batch_size=256)):
            img.append(clip.image.encode(batch["image"]))
            txt.append(clip.text.encode(batch["ids"]))
            if i == 0:  # the offline loader gives the trained model itself
                ref = torch.nn.functional.normalize(reference.encode_image(batch["image"]), dim=-1)
                torch.testing.assert_close(img[0], ref, atol=1e-5, rtol=0)
            present.append(batch["present"])
            pair.append(batch["pair"])
    return group_retrieval_top1(torch.cat(img), torch.cat(txt), torch.cat(present), torch.cat(pair), 32)


def test_shipped_model_retrieves(shipped_retrieval) -> None:
    """Acceptance (issue 6): 1,024 held-out pairs in groups of 32, both directions top-1 >= 0.9 (chance ~0.1, a
    colour-only model ~0.4; measured 0.940 / 0.915, docs/benchmarks.md §2)."""
    t2i, i2t = shipped_retrieval
    assert t2i >= 0.9 and i2t >= 0.9, (t2i, i2t)
