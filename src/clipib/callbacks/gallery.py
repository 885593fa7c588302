"""TensorBoard gallery: per method, the first pairs of rank 0 with their heat overlay and shaded tokens, each
tile marked matched / mismatched (when the data says) and showing the pair's metric values."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import numpy as np
from lightning.pytorch import Callback, LightningModule, Trainer
from PIL import Image

from clipib.callbacks.records import map_batch, record_values
from clipib.viz import explanation_figure, stack, to_uint8


class Gallery(Callback):
    """Render the first ``n`` pairs per method (first seed) and log them to TensorBoard as images.

    Also saves ``gallery_<method>.png`` in the run directory (``out_dir`` or ``trainer.default_root_dir``).
    A mismatched pair (``matched`` false in the batch: its caption names something absent) gets a red frame and
    title, a matched one green ones; below the title, the pair's metric values (and the values its
    matched-vs-mismatched AUROCs read) from its record.
    """

    def __init__(self, n: int = 8, out_dir: Optional[str] = None) -> None:
        self.n = n
        self.out_dir = out_dir
        self.figures: Dict[str, List[Image.Image]] = {}

    def on_test_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        if trainer.global_rank != 0 or not outputs or not outputs.get("maps"):
            return
        clip, first_seed = pl_module.clip, pl_module.seeds[0]
        values = {(r["key"], r["method"], r["seed"]): r for r in outputs.get("records", [])}
        for (method, seed), attr in outputs["maps"].items():
            figs = self.figures.setdefault(method, [])
            if seed != first_seed or len(figs) >= self.n:
                continue
            b = map_batch(outputs, seed)
            for i in range(min(self.n - len(figs), len(b["key"]))):
                tokens = clip.token_strings(b["ids"][i])
                scores = attr.text[i, : len(tokens)].tolist() if attr.text is not None else None
                heat = attr.image[i] if attr.image is not None else None
                title, frame = tile_title(method, b, i)
                record = values.get((b["key"][i], method, seed), {})
                subtitle = value_lines({k: record[k] for k in pl_module.value_names(method) if k in record})
                figs.append(explanation_figure(to_uint8(b["image"][i], clip.normalization), heat, tokens, scores,
                                               title, subtitle=subtitle, frame=frame))

    def on_test_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if trainer.global_rank != 0:
            return
        run = Path(self.out_dir or trainer.default_root_dir)
        run.mkdir(parents=True, exist_ok=True)
        experiment = getattr(trainer.logger, "experiment", None) if trainer.logger else None
        for method, figs in self.figures.items():
            if not figs:
                continue
            sheet = stack(figs)
            sheet.save(run / f"gallery_{method}.png")
            if experiment is not None and hasattr(experiment, "add_image"):
                experiment.add_image(f"gallery/{method}", np.asarray(sheet), 0, dataformats="HWC")
        if hasattr(experiment, "flush"):
            experiment.flush()


def tile_title(method: str, batch: Dict[str, Any], i: int) -> Tuple[str, Optional[str]]:
    """``(title, colour)`` of pair ``i``: method, key and matched / MISMATCHED (green / red; None if unknown)."""
    title = f"{method} · {batch['key'][i]}"
    if "matched" not in batch:
        return title, None
    matched = bool(batch["matched"][i])
    return f"{title} · {'matched' if matched else 'MISMATCHED'}", "#1a7f37" if matched else "#cf222e"


def value_lines(record: Dict[str, Any], width: int = 68) -> str:
    """A record's per-sample values as ``name value`` items, in lines of at most ``width`` characters."""
    items = [f"{k} {v:.3g}" for k, v in record_values(record).items()]
    lines: List[str] = []
    for item in items:
        if lines and len(lines[-1]) + 3 + len(item) <= width:
            lines[-1] += " · " + item
        else:
            lines.append(item)
    return "\n".join(lines)

