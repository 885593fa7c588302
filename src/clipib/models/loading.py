"""Loading open_clip models as frozen :class:`~clipib.models.split.SplitCLIP` objects, offline-friendly.

``model`` is an open_clip model name (``"ViT-B-32-quickgelu"``), the path of an open_clip JSON model
config, or ``"clipib-shapes"`` (the small CLIP clipib ships, trained on its synthetic world).
``pretrained`` is an open_clip tag (``"openai"``), a local checkpoint (``.safetensors`` or a torch state
dict, read with ``weights_only=True``), ``None`` for random weights, or ``"default"``: the shipped weights
for ``clipib-shapes``, ``"openai"`` for every other model.

Checkpoints are never unpickled: every ``torch.load`` during loading is weights-only whatever the caller or the
environment says (:func:`_weights_only`), and a file that needs more is refused with one line (no opt-out).
"""

from __future__ import annotations

import contextlib
import logging
import os
import pickle
import socket
from pathlib import Path
from typing import Callable, Optional, Tuple, Union

import open_clip
from open_clip.transform import PreprocessCfg, image_transform_v2
import torch

from clipib.models.split import SplitCLIP, caption_tokens

PACKAGE_DIR = Path(__file__).resolve().parent.parent
SHIPPED_MODELS = {
    "clipib-shapes": (
        PACKAGE_DIR / "model_configs" / "clipib-shapes.json",
        PACKAGE_DIR / "assets" / "clipib-shapes.safetensors",
    ),
}
DEFAULT = "default"

log = logging.getLogger(__name__)


class ModelLoadError(RuntimeError):
    """Raised with a one-line, user-facing message when a model or its weights cannot be loaded."""


def register_model(model: str) -> str:
    """Make ``model`` (an open_clip name, a JSON config path, or a clipib model) known to open_clip; return the
    name open_clip knows it by."""
    if model in SHIPPED_MODELS:
        config = SHIPPED_MODELS[model][0]
    elif model.endswith(".json"):
        config = Path(model)
        if not config.is_file():
            raise ModelLoadError(f"model config not found: {model}")
    else:
        if open_clip.get_model_config(model) is None:
            raise ModelLoadError(
                f"unknown model '{model}': use an open_clip name (e.g. ViT-B-32-quickgelu), "
                "a JSON config path, or clipib-shapes"
            )
        return model
    open_clip.add_model_config(str(config))
    return config.stem


def _resolve_pretrained(model: str, name: str, pretrained: Optional[str]) -> Optional[str]:
    """Turn ``pretrained`` into what open_clip's ``create_model`` takes (a tag, a file path or None)."""
    if pretrained == DEFAULT:
        if model in SHIPPED_MODELS:
            weights = SHIPPED_MODELS[model][1]
            if not weights.is_file():
                raise ModelLoadError(f"the shipped weights of {model} are missing: {weights}")
            return str(weights)
        pretrained = "openai"
    if pretrained is None or pretrained == "none":
        return None
    if os.path.exists(pretrained):
        if not os.path.isfile(pretrained):
            raise ModelLoadError(f"--pretrained must be a checkpoint file, got a directory: {pretrained}")
        return pretrained
    if pretrained not in open_clip.list_pretrained_tags_by_model(name):
        raise ModelLoadError(
            f"'{pretrained}' is neither a file nor a known open_clip tag for {name} "
            f"(tags: {', '.join(open_clip.list_pretrained_tags_by_model(name)) or 'none'})"
        )
    return pretrained


class _DropLibraryRecords(logging.Filter):
    """Drops records that open_clip logs on the root logger (it calls ``logging.info`` / ``logging.warning``)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not (record.name == "root" and f"{os.sep}open_clip{os.sep}" in record.pathname)


@contextlib.contextmanager
def _quiet(offline: bool):
    """Silence open_clip's and huggingface_hub's own log records while loading; with ``offline``, forbid Hub
    requests. Only those two libraries' records are dropped: every other logger of the process keeps logging."""
    import huggingface_hub.constants as hub

    hub_log = logging.getLogger("huggingface_hub")
    was_offline, was_level = hub.HF_HUB_OFFLINE, hub_log.level
    hub.HF_HUB_OFFLINE = offline or was_offline
    drop = _DropLibraryRecords()
    logging.getLogger().addFilter(drop)
    hub_log.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        hub.HF_HUB_OFFLINE = was_offline
        hub_log.setLevel(was_level)
        logging.getLogger().removeFilter(drop)


def _hub_reachable(host: str = "huggingface.co", timeout: float = 3.0) -> bool:
    """Whether the Hub's name resolves and a TCP connection opens within ``timeout`` seconds."""
    try:
        with socket.create_connection((host, 443), timeout=timeout):
            return True
    except OSError:
        return False


FORCE_WEIGHTS_ONLY = "TORCH_FORCE_WEIGHTS_ONLY_LOAD"
FORCE_FULL_UNPICKLING = "TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD"


@contextlib.contextmanager
def _weights_only():
    """Every ``torch.load`` inside reads weights only, whatever its caller passes or the environment says.

    open_clip passes ``weights_only=True``, but retries ``torch.load`` *without* it when the first call raises
    ``TypeError``, and torch lets ``TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD=1`` turn such an unqualified call into full
    unpickling. Inside this block torch's own ``TORCH_FORCE_WEIGHTS_ONLY_LOAD=1`` holds and the other variable
    is cleared, so no library fallback and no environment setting can unpickle a checkpoint. There is no
    opt-out: a checkpoint that needs full unpickling is refused (:func:`_refusal`).
    """
    saved = {k: os.environ.get(k) for k in (FORCE_WEIGHTS_ONLY, FORCE_FULL_UNPICKLING)}
    os.environ[FORCE_WEIGHTS_ONLY] = "1"
    os.environ.pop(FORCE_FULL_UNPICKLING, None)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _refusal(err: BaseException, weights: str) -> Optional[str]:
    """The one-line refusal for a checkpoint that needs more than weights-only loading (None for other errors)."""
    chain, seen = [], err
    while seen is not None and len(chain) < 10:
        chain.append(seen)
        seen = seen.__cause__ or seen.__context__
    text = " ".join(str(e) for e in chain)
    if any(isinstance(e, pickle.UnpicklingError) for e in chain) or "Weights only load failed" in text:
        what = "needs full unpickling, which can run arbitrary code"
    elif "TorchScript" in text:
        what = "is a TorchScript archive (code, not weights)"
    else:
        return None
    return (f"refused checkpoint {weights}: it {what}; clipib loads only .safetensors files and torch state dicts "
            "readable with weights_only=True (re-save the state dict as safetensors where you trust the file)")


def _create(name: str, weights: Optional[str], device: Union[str, torch.device]):
    """``create_model_and_transforms`` from a file, the local cache, or (if reachable) the Hub; torch files are
    read weights-only (:func:`_weights_only`)."""
    is_file = weights is None or os.path.isfile(weights)
    for offline in ((False,) if is_file else (True, False)):
        if not offline and not is_file and not _hub_reachable():
            break
        try:
            with _quiet(offline), _weights_only():
                model, _, preprocess = open_clip.create_model_and_transforms(
                    name, pretrained=weights, device=device, weights_only=True
                )
            return model, preprocess
        except Exception as err:  # open_clip raises RuntimeError, safetensors/pickle their own
            refused = _refusal(err, str(weights))
            if refused:
                raise ModelLoadError(refused) from None
            if is_file:
                raise ModelLoadError(f"cannot load {name} from {weights}: {str(err).splitlines()[0][:300]}") from err
    raise ModelLoadError(
        f"cannot download open_clip weights '{weights}' for {name} (no network, not in the local cache): "
        "pass --pretrained PATH with a local checkpoint (.safetensors or state dict)"
    )


class LazyTokenizer:
    """open_clip's tokenizer for a model, built on first use: a caller that passes token ids never builds it.

    SigLIP-family tokenizers need the ``transformers`` package and the HF tokenizer files; when they are
    missing the first call raises :class:`ModelLoadError` with one line saying what to install or fetch.
    """

    def __init__(self, name: str) -> None:
        self.name = name
        self._tokenizer: Optional[Callable] = None

    def build(self) -> Callable:
        """The open_clip tokenizer (built once)."""
        if self._tokenizer is None:
            try:
                with _quiet(offline=not _hub_reachable()):
                    self._tokenizer = open_clip.get_tokenizer(self.name)
            except ModuleNotFoundError as err:
                raise ModelLoadError(
                    f"the tokenizer of {self.name} needs the '{err.name}' package (pip install {err.name}) "
                    "and its HF tokenizer files; pass token ids to avoid it"
                ) from err
            except OSError as err:
                raise ModelLoadError(
                    f"the HF tokenizer files of {self.name} are not in the local cache and cannot be downloaded: "
                    f"{str(err).splitlines()[0][:200]}"
                ) from err
        return self._tokenizer

    def __call__(self, texts, context_length: Optional[int] = None):
        """Token ids ``[B, ctx]`` of ``texts`` (CPU)."""
        tok = self.build()
        return tok(texts) if context_length is None else tok(texts, context_length=context_length)

    def __getattr__(self, attr: str):
        if attr.startswith("_"):
            raise AttributeError(attr)
        return getattr(self.build(), attr)


def load_clip(
    model: str = "ViT-B-32-quickgelu",
    pretrained: Optional[str] = DEFAULT,
    device: Union[str, torch.device] = "cpu",
    text_length_multiple: int = 1,
) -> SplitCLIP:
    """Load a CLIP model, frozen and in eval mode, split into towers that can be cut at any block.

    The open_clip model is frozen *in place*: every parameter gets ``requires_grad=False`` and the model is put
    in eval mode (and kept there: ``SplitCLIP.train()`` is a no-op). To fine-tune the same weights, take
    ``clip.model`` and call ``requires_grad_(True)`` / ``train()`` on it yourself (train.py's modules do).

    Args:
        model: open_clip model name, path of an open_clip JSON config, or ``"clipib-shapes"``.
        pretrained: open_clip tag, local checkpoint path, ``None`` (random weights) or ``"default"``.
        device: where the model lives.
        text_length_multiple: the causal text tower runs on the batch's longest caption rounded up to a
            multiple of this (:attr:`~clipib.models.split.TextTower.length_multiple`; results equal to float
            rounding, fewer distinct shapes for ``compile=True``).

    Raises:
        ModelLoadError: unknown model, missing file, weights that cannot be downloaded (no network),
            or an architecture :class:`SplitCLIP` cannot split.
    """
    if text_length_multiple < 1:
        raise ValueError(f"text_length_multiple must be >= 1, got {text_length_multiple}")
    name = register_model(model)
    weights = _resolve_pretrained(model, name, pretrained)
    clip_model, preprocess = _create(name, weights, device)
    tokens = caption_tokens((open_clip.get_model_config(name) or {}).get("text_cfg", {}), name)
    clip = SplitCLIP(clip_model, preprocess=preprocess, tokenizer=LazyTokenizer(name), name=model, text_tokens=tokens)
    clip.text.length_multiple = int(text_length_multiple)
    return clip


def load_transforms(model: str) -> Tuple[Callable, Callable]:
    """``(preprocess, tokenizer)`` of a model without building it or loading weights."""
    name = register_model(model)
    cfg = open_clip.get_model_config(name)
    pp = dict(cfg.get("preprocess_cfg", {}))
    pp.setdefault("size", cfg["vision_cfg"]["image_size"])
    preprocess = image_transform_v2(PreprocessCfg(**pp), is_train=False)
    return preprocess, LazyTokenizer(name)
