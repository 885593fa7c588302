"""Write a trained model's weights as half-precision safetensors when fitting ends."""

from __future__ import annotations

from pathlib import Path

import torch
from lightning import Callback, LightningModule, Trainer
from safetensors.torch import save_file


class HalfSafetensorsExport(Callback):
    """On ``fit`` end, save ``pl_module.<attr>.state_dict()`` to ``path`` with float tensors in fp16.

    The keys are the wrapped module's own (for ``ContrastivePretrainModule``: open_clip ``CLIP`` keys),
    so the file loads with ``model.load_state_dict`` after casting back to fp32.
    """

    def __init__(self, path: str, attr: str = "model") -> None:
        """``path``: output ``.safetensors`` file; ``attr``: the LightningModule attribute to export."""
        super().__init__()
        self.path, self.attr = Path(path), attr

    def on_fit_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Write the file (global rank 0 only)."""
        if not trainer.is_global_zero:
            return
        module = getattr(pl_module, self.attr)
        state = {k: (v.detach().to(torch.float16) if v.is_floating_point() else v.detach()).cpu().contiguous()
                 for k, v in module.state_dict().items()}
        self.path.parent.mkdir(parents=True, exist_ok=True)
        save_file(state, str(self.path), metadata={"format": "pt", "dtype": "float16"})
