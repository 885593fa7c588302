"""clipib's own open_clip model configs (``src/clipib/model_configs/*.json``) and shipped weights.

open_clip resolves a model name through its config registry; clipib's configs are registered there under
their file stem (``clipib-shapes``), so ``open_clip.create_model("clipib-shapes")`` builds the architecture
and ``open_clip.get_tokenizer("clipib-shapes")`` the matching tokenizer. No weights are needed for either.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable

import open_clip
import torch
from PIL import Image

MODEL_CONFIG_DIR = Path(__file__).resolve().parent.parent / "model_configs"
ASSET_DIR = Path(__file__).resolve().parent.parent / "assets"

Preprocess = Callable[[Image.Image], torch.Tensor]
Tokenizer = Callable[[list[str]], torch.Tensor]


def register_local_configs() -> list[str]:
    """Register every JSON in ``clipib/model_configs`` with open_clip; return the registered names."""
    names = []
    for path in sorted(MODEL_CONFIG_DIR.glob("*.json")):
        open_clip.add_model_config(path)
        names.append(path.stem)
    return names


def resolve_model_config(model: str) -> tuple[str, dict[str, Any]]:
    """Return ``(name, config dict)`` for a clipib/open_clip model name or a path to an open_clip JSON.

    A JSON path is registered with open_clip under its file stem, so the name works with
    ``open_clip.create_model`` afterwards.
    """
    path = Path(model)
    if path.suffix == ".json":
        if not path.is_file():
            raise FileNotFoundError(f"model config not found: {path}")
        cfg = json.loads(path.read_text())
        if not all(k in cfg for k in ("embed_dim", "vision_cfg", "text_cfg")):
            raise ValueError(f"{path} is not an open_clip model config (needs embed_dim, vision_cfg, text_cfg)")
        open_clip.add_model_config(path)
        return path.stem, cfg
    register_local_configs()
    cfg = open_clip.get_model_config(model)
    if cfg is None:
        raise ValueError(f"unknown model config {model!r}; known clipib configs: {register_local_configs()}")
    return model, cfg


def local_transforms(model: str = "clipib-shapes") -> tuple[Preprocess, Tokenizer]:
    """Eval-time ``(preprocess, tokenizer)`` of a model config, built without weights.

    preprocess: open_clip's eval transform (resize shortest side + centre crop + OpenAI mean/std) at the
    config's image size; tokenizer: ``open_clip.get_tokenizer`` at the config's context length.
    """
    name, cfg = resolve_model_config(model)
    size = cfg["vision_cfg"]["image_size"]
    preprocess = open_clip.image_transform(size, is_train=False)
    tokenizer = open_clip.get_tokenizer(name)
    return preprocess, tokenizer
