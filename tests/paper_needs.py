"""Which options a shipped paper config sets that its classes do not offer.

The configs in configs/paper/ name many method and source options (AdaIB ``embeddings`` / ``mlp_activation``,
M2IB ``sigma``, the shard source's ``selection`` / ``manifest``, Flickr8k's ``caption_choice`` values). A method
spec is a plain dict that the CLI does not check against the method's signature, so a misspelt option would only
fail when the method is built: tests/test_paper_configs.py checks every config up front with
:func:`missing_options`.
"""

from __future__ import annotations

import inspect
import typing
from pathlib import Path
from typing import Any, Dict, List

import yaml

import clipib

def _params(cls: type) -> Dict[str, Any]:
    """``{name: resolved annotation}`` of ``cls.__init__`` (string annotations evaluated)."""
    hints = typing.get_type_hints(cls.__init__)
    return {k: hints.get(k, p.annotation) for k, p in inspect.signature(cls.__init__).parameters.items()}


def _literal_values(annotation: Any) -> List[Any]:
    """Every ``Literal`` value inside an annotation (``Union[Literal[...], int]`` included)."""
    if typing.get_origin(annotation) is typing.Literal:
        return list(typing.get_args(annotation))
    return [v for arg in typing.get_args(annotation) for v in _literal_values(arg)]


def _class(path: str) -> type:
    module, name = path.rsplit(".", 1)
    return getattr(__import__(module, fromlist=[name]), name)


def missing_options(config: Path) -> List[str]:
    """``"<Class>.<option>"`` (or ``"<Class>.<option>=<value>"``) for each option ``config`` sets and nothing offers."""
    cfg = yaml.safe_load(Path(config).read_text())
    missing: List[str] = []
    for name, spec in (cfg["model"].get("methods") or {}).items():
        spec = dict(spec or {})
        cls = clipib.METHODS[spec.pop("method", name)]
        params = _params(cls)
        missing += [f"{cls.__name__}.{key}" for key in spec if key not in params]
        missing += [f"{cls.__name__}.{key}=list" for key, value in spec.items()
                    if isinstance(value, list) and key in params and params[key] is int]
    dataset = cfg["data"]["init_args"]["dataset"]
    cls = _class(dataset["class_path"])
    params = _params(cls)
    for key, value in (dataset.get("init_args") or {}).items():
        if key not in params:
            missing.append(f"{cls.__name__}.{key}")
        elif isinstance(value, str) and key == "caption_choice":
            allowed = _literal_values(params[key])
            if allowed and value not in allowed:
                missing.append(f"{cls.__name__}.{key}={value}")
    return sorted(set(missing))
