"""Contrastive pre-training of a small open_clip CLIP from scratch (the shipped ``clipib-shapes`` model).

The model is ``open_clip.create_model(<config>)`` with random init; the loss is open_clip's own
``ClipLoss``; the optimiser follows open_clip's training recipe (AdamW, no weight decay on gains, biases
and ``logit_scale``, linear warm-up then cosine decay, ``logit_scale`` clamped to ln 100 after each step).
Validation logs retrieval top-1 within groups of ``retrieval_group`` pairs (see ``group_retrieval_top1``).
"""

from __future__ import annotations

import math
from pathlib import Path

import open_clip
import torch
from lightning import LightningModule
from safetensors.torch import load_file

from clipib.data.sources.base import ModelTransforms
from clipib.models.loading import register_model
from clipib.models.split import TextTower


def build_model(model_config: str = "clipib-shapes", weights: str | Path | None = None) -> torch.nn.Module:
    """An open_clip ``CLIP`` from a clipib/open_clip config name or JSON path; random init unless ``weights``.

    ``weights`` is a safetensors file holding open_clip's own ``CLIP.state_dict()`` keys (any float dtype;
    cast to fp32 and loaded strictly). The model returns dicts (``output_dict=True``).
    """
    name = register_model(model_config)
    model = open_clip.create_model(name, pretrained=None, output_dict=True)
    if weights is not None:
        state = {k: v.float() for k, v in load_file(str(weights)).items()}
        model.load_state_dict(state, strict=True)
    return model


def group_retrieval_top1(image_emb: torch.Tensor, text_emb: torch.Tensor, present: torch.Tensor,
                         pair: torch.Tensor, group: int = 32) -> tuple[float, float]:
    """Text->image and image->text top-1 accuracy within consecutive groups of ``group`` pairs.

    ``image_emb``/``text_emb`` [N, E] (normalised), ``present`` BoolTensor[N, P] (pairs each image holds),
    ``pair`` LongTensor[N] (pair each caption names). Text->image is right when the top image of a caption
    holds the named object; image->text when the top caption names an object the image holds. A trailing
    partial group is dropped.

    >>> e = torch.eye(4)
    >>> group_retrieval_top1(e, e, torch.eye(4, dtype=torch.bool), torch.arange(4), group=2)
    (1.0, 1.0)
    """
    n = (image_emb.shape[0] // group) * group
    if n == 0:
        raise ValueError(f"need at least one full group of {group} pairs, got {image_emb.shape[0]}")
    img = image_emb[:n].reshape(-1, group, image_emb.shape[-1])  # [G, g, E]
    txt = text_emb[:n].reshape(-1, group, text_emb.shape[-1])  # [G, g, E]
    hold = present[:n].reshape(-1, group, present.shape[-1])  # [G, g, P]
    named = pair[:n].reshape(-1, group)  # [G, g]
    sim = img @ txt.transpose(1, 2)  # [G, g_img, g_txt]
    # holds[g, i, j]: image i of group g holds the object caption j names
    holds = torch.gather(hold, 2, named[:, None, :].expand(-1, group, -1))  # [G, g_img, g_txt]
    top_img = sim.argmax(dim=1)  # [G, g_txt]
    top_txt = sim.argmax(dim=2)  # [G, g_img]
    t2i = torch.gather(holds, 1, top_img[:, None, :]).float().mean().item()
    i2t = torch.gather(holds, 2, top_txt[:, :, None]).float().mean().item()
    return t2i, i2t


def warmup_cosine(optimizer: torch.optim.Optimizer, warmup_steps: int, total_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    """open_clip's schedule, stepped per batch: linear warm-up over ``warmup_steps`` then cosine decay to 0 at
    ``total_steps``."""
    total = max(total_steps, 1)
    warm = min(warmup_steps, total)

    def factor(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        return 0.5 * (1.0 + math.cos(math.pi * (step - warm) / max(total - warm, 1)))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


class ContrastivePretrainModule(LightningModule):
    """Train an open_clip CLIP from scratch with open_clip's ``ClipLoss`` on batches of (image, ids).

    Batches follow clipib's batch contract; validation also needs ``present`` and ``pair`` (as produced by
    ``clipib.data.sources.synthetic``) for the group retrieval accuracy. The DataModule gets this model's
    transforms in :meth:`setup` (``clipib.data.TrainDataModule.use_transforms``).
    """

    def __init__(self, model_config: str = "clipib-shapes", lr: float = 1e-3, weight_decay: float = 0.1,
                 betas: tuple[float, float] = (0.9, 0.98), eps: float = 1e-6, warmup_steps: int = 100,
                 retrieval_group: int = 32, fixed_logit_scale: float | None = None,
                 init_weights: str | None = None) -> None:
        """Build the randomly initialised model (``model_config``: name or JSON path) and the loss.

        ``fixed_logit_scale`` (a deviation from CLIP's learned temperature, off by default): hold the logit
        scale at this value (e.g. 100, open_clip's clamp maximum) for the whole run. On the shapes world a
        learned scale falls while the model sits on its colour-only plateau, which slows the escape to
        shape (measured in docs/benchmarks.md §2). ``init_weights``: start from these weights (a safetensors
        file of open_clip ``CLIP`` keys, e.g. an earlier stage's export) instead of a random init.
        """
        super().__init__()
        self.save_hyperparameters()
        self.model = build_model(model_config, init_weights)
        if fixed_logit_scale is not None:
            if not 0 < fixed_logit_scale <= 100:
                raise ValueError(f"fixed_logit_scale must be in (0, 100], got {fixed_logit_scale}")
            with torch.no_grad():
                self.model.logit_scale.fill_(math.log(fixed_logit_scale))
            self.model.logit_scale.requires_grad_(False)
        self.loss_fn = open_clip.loss.ClipLoss()
        # the text tower on ids trimmed to the batch's longest SOT..EOT (exact under the causal mask; the
        # model's own encode_text runs all 77 positions); a tuple, so its shared modules are not registered twice
        self._text = (TextTower(self.model),)
        self._val: list[dict[str, torch.Tensor]] = []

    def setup(self, stage: str) -> None:
        """Hand this model's eval preprocess and tokenizer to the DataModule (before its dataloaders)."""
        datamodule = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        if hasattr(datamodule, "use_transforms"):
            datamodule.use_transforms(ModelTransforms.from_config(self.hparams.model_config))

    def embed(self, images: torch.Tensor, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """L2-normalised image and text embeddings ``[B, E]`` (text on trimmed ids)."""
        return self.model.encode_image(images, normalize=True), self._text[0].encode(ids)

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        """Symmetric InfoNCE over the batch (open_clip ``ClipLoss``)."""
        img, txt = self.embed(batch["image"], batch["ids"])
        loss = self.loss_fn(img, txt, self.model.logit_scale.exp())
        self.log("train/loss", loss, prog_bar=True)
        self.log("train/logit_scale", self.model.logit_scale.detach().exp())
        return loss

    def on_train_batch_end(self, outputs: object, batch: dict, batch_idx: int) -> None:
        """Clamp the learnable temperature to [0, ln 100], as open_clip's trainer does."""
        with torch.no_grad():
            self.model.logit_scale.clamp_(0, math.log(100))

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        """Embed the pairs; the retrieval accuracy is computed over the whole split at epoch end."""
        img, txt = self.embed(batch["image"], batch["ids"])
        self._val.append({"img": img, "txt": txt,
                          "present": batch["present"], "pair": batch["pair"]})

    def on_validation_epoch_end(self) -> None:
        """Log ``val/t2i_top1`` and ``val/i2t_top1`` within groups of ``retrieval_group``."""
        if not self._val:
            return
        cat = {k: torch.cat([v[k] for v in self._val]) for k in self._val[0]}
        self._val.clear()
        if cat["img"].shape[0] < self.hparams.retrieval_group:
            return  # sanity-check batches: too few pairs for one group
        t2i, i2t = group_retrieval_top1(cat["img"], cat["txt"], cat["present"], cat["pair"],
                                        self.hparams.retrieval_group)
        self.log("val/t2i_top1", t2i, prog_bar=True)
        self.log("val/i2t_top1", i2t, prog_bar=True)

    def configure_optimizers(self) -> dict:
        """AdamW (no decay on 1-d params and ``logit_scale``) + linear warm-up and cosine decay to 0."""
        decay, no_decay = [], []
        for name, p in self.model.named_parameters():
            (no_decay if p.ndim < 2 or "logit_scale" in name else decay).append(p)
        hp = self.hparams
        opt = torch.optim.AdamW([{"params": decay, "weight_decay": hp.weight_decay},
                                 {"params": no_decay, "weight_decay": 0.0}],
                                lr=hp.lr, betas=tuple(hp.betas), eps=hp.eps)
        sched = warmup_cosine(opt, hp.warmup_steps, int(self.trainer.estimated_stepping_batches))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}
