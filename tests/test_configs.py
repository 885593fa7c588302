"""The shipped configs: every eval/paper config parses and builds its data; trainer blocks and training-stage
overlays compose with repeated ``-c``; each composed training stage is exactly the recipe it replaced."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any, Dict, List

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
CONFIGS = sorted(str(p) for p in (ROOT / "configs").glob("*/*.yaml") if p.parent.name in ("paper", "eval"))
BLOCKS = sorted(str(p) for p in (ROOT / "configs" / "trainer").glob("*.yaml"))
TRAIN = ROOT / "configs" / "train"
IDS = [Path(c).stem for c in CONFIGS]


def _printed(main, args: List[str], capsys) -> Dict[str, Any]:
    """The config ``main(args + --print_config)`` resolves, as a dict."""
    with pytest.raises(SystemExit) as exit_info:
        main([*args, "--print_config"])
    assert exit_info.value.code in (0, None)
    return yaml.safe_load(capsys.readouterr().out)


def _eval(args: List[str]) -> None:
    from clipib.lit.cli import eval_cli

    eval_cli(args=args)


def _train(args: List[str]) -> None:
    spec = importlib.util.spec_from_file_location("clipib_train_entry", ROOT / "train.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    module.main(args)


@pytest.mark.parametrize("config", CONFIGS, ids=IDS)
@pytest.mark.filterwarnings("ignore:LightningCLI's args parameter")
def test_config_parses(config, capsys):
    printed = _printed(_eval, ["test", "-c", config], capsys)
    assert printed["model"]["methods"] and printed["data"]["init_args"]["dataset"]["class_path"]


@pytest.mark.parametrize("block", BLOCKS, ids=[Path(b).stem for b in BLOCKS])
@pytest.mark.filterwarnings("ignore:LightningCLI's args parameter")
def test_trainer_block_then_eval_config(block, capsys):
    printed = _printed(_eval, ["test", "-c", block, "-c", str(ROOT / "configs" / "eval" / "shapes.yaml")], capsys)
    for key, value in yaml.safe_load(Path(block).read_text())["trainer"].items():
        assert printed["trainer"][key] == value, key


@pytest.mark.parametrize("config", CONFIGS, ids=IDS)
def test_data_section_builds_its_source(config):
    """The ``data:`` block alone: EvalDataModule by class_path, its source built without reading any file."""
    from jsonargparse import ArgumentParser

    from clipib.data import EvalDataModule, Source

    parser = ArgumentParser(exit_on_error=False)
    parser.add_subclass_arguments(EvalDataModule, "data")
    data = yaml.safe_load(Path(config).read_text())["data"]
    dm = parser.instantiate(parser.parse_object({"data": data})).data
    assert isinstance(dm, EvalDataModule) and isinstance(dm.dataset, Source)


@pytest.mark.parametrize("config", CONFIGS, ids=IDS)
def test_eval_configs_leave_records_logger_and_hardware_to_blocks(config):
    """RecordWriter and TensorBoard are the eval CLI's defaults; hardware comes from configs/trainer/ blocks
    (placed first, so a job config must not set it again) — except demo.yaml, which `make demo` runs alone."""
    trainer = yaml.safe_load(Path(config).read_text())["trainer"]
    assert trainer["default_root_dir"] and "logger" not in trainer
    assert all("RecordWriter" not in c["class_path"] for c in trainer.get("callbacks", []))
    if Path(config).stem != "demo":
        assert not {"accelerator", "devices", "strategy"} & set(trainer), config


@pytest.mark.parametrize("config", CONFIGS, ids=IDS)
def test_config_names_are_registered(config):
    import clipib
    from clipib.metrics import METRICS

    model = yaml.safe_load(Path(config).read_text())["model"]
    for name, spec in model["methods"].items():
        assert (spec or {}).get("method", name) in clipib.METHODS, name
    assert set(model.get("metrics", {})) <= set(METRICS)


# What each stage's own file resolved to before the base + overlay split (values copied from those files).
COMMON = {
    "seed_everything": 0,
    "trainer.accelerator": "cpu", "trainer.devices": 1, "trainer.deterministic": True, "trainer.val_check_interval": 500,
    "trainer.check_val_every_n_epoch": None, "trainer.num_sanity_val_steps": 0, "trainer.log_every_n_steps": 10,
    "trainer.enable_checkpointing": False,
    "model.class_path": "clipib.lit.pretrain_module.ContrastivePretrainModule",
    "model.init_args.model_config": "clipib-shapes", "model.init_args.weight_decay": 0.05,
    "model.init_args.fixed_logit_scale": 100.0, "model.init_args.retrieval_group": 32,
    # the old ShapesDataModule(model=clipib-shapes, val/test 1024 pairs, seeds 1/2, eval_mismatch_rate 0, ...)
    "data.init_args.train.init_args.split": "train", "data.init_args.train.init_args.minimal_pairs": True,
    "data.init_args.train.init_args.mismatch_rate": 0.0,
    "data.init_args.val.init_args.size": 1024, "data.init_args.val.init_args.seed": 1,
    "data.init_args.val.init_args.mismatch_rate": 0.0, "data.init_args.val.init_args.minimal_pairs": False,
    "data.init_args.test.init_args.size": 1024, "data.init_args.test.init_args.seed": 2,
    "data.init_args.batch_size": 128, "data.init_args.eval_batch_size": 32, "data.init_args.num_workers": 1,
}
STAGES = {  # stage overlay -> (max_steps, run dir, export, lr, warmup, init weights, train pairs, train seed)
    "shapes_clip": (2300, "outputs/train/shapes_clip", "outputs/train/shapes_clip/stage1.safetensors",
                    0.001, 100, None, 294400, 0),
    "shapes_clip_anneal": (1000, "outputs/train/shapes_clip_anneal", "outputs/train/shapes_clip_anneal/stage2.safetensors",
                           0.0003, 50, "outputs/train/shapes_clip/stage1.safetensors", 128000, 3),
    "shapes_clip_anneal2": (1000, "outputs/train/shapes_clip_anneal2", "outputs/train/shapes_clip_anneal2/stage3.safetensors",
                            0.0002, 50, "outputs/train/shapes_clip_anneal/stage2.safetensors", 128000, 4),
    "shapes_clip_anneal3": (1500, "outputs/train/shapes_clip_anneal3", "src/clipib/assets/clipib-shapes.safetensors",
                            0.00015, 50, "outputs/train/shapes_clip_anneal2/stage3.safetensors", 192000, 5),
}


def _get(config: Dict[str, Any], dotted: str) -> Any:
    for part in dotted.split("."):
        config = config[part]
    return config


@pytest.mark.parametrize("stage", list(STAGES))
@pytest.mark.filterwarnings("ignore:LightningCLI's args parameter")
def test_training_stage_composes_to_its_recipe(stage, capsys):
    overlay = [] if stage == "shapes_clip" else ["-c", str(TRAIN / f"{stage}.yaml")]
    printed = _printed(_train, ["fit", "-c", str(TRAIN / "shapes_clip.yaml"), *overlay], capsys)
    steps, run, export, lr, warmup, init, size, seed = STAGES[stage]
    want = {**COMMON, "trainer.max_steps": steps, "trainer.default_root_dir": run, "model.init_args.lr": lr,
            "model.init_args.warmup_steps": warmup, "model.init_args.init_weights": init,
            "data.init_args.train.init_args.size": size, "data.init_args.train.init_args.seed": seed}
    assert {key: _get(printed, key) for key in want} == want
    (callback,) = printed["trainer"]["callbacks"]
    assert callback["class_path"] == "clipib.callbacks.safetensors_export.HalfSafetensorsExport"
    assert callback["init_args"]["path"] == export
    assert size == steps * 128  # every training pair is seen once


@pytest.mark.parametrize("block", BLOCKS, ids=[Path(b).stem for b in BLOCKS])
@pytest.mark.filterwarnings("ignore:LightningCLI's args parameter")
def test_trainer_blocks_compose_with_training(block, capsys):
    printed = _printed(_train, ["fit", "-c", str(TRAIN / "shapes_clip.yaml"), "-c", block], capsys)
    for key, value in yaml.safe_load(Path(block).read_text())["trainer"].items():
        assert printed["trainer"][key] == value, key
    assert printed["trainer"]["max_steps"] == 2300
