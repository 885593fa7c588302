"""ROAR fine-tuning (M2IB Sec. 4.4, ROAR+; InputIBA App. D.4, the removal curve): fine-tune a CLIP with its own
contrastive loss on degraded pairs, validate on original pairs.

``python train.py fit -c configs/roar/shapes.yaml`` pairs this module with :class:`clipib.roar.RoarDataModule`.
The model is loaded by :func:`clipib.load_clip` (any open_clip model, local checkpoints, ``clipib-shapes``);
the loss is open_clip's ``ClipLoss``; the optimiser is open_clip's recipe (AdamW without decay on gains and
biases, linear warm-up then cosine decay). The temperature stays at the pretrained value (a fine-tuning
choice: the papers are silent, and a learned scale moves with the degraded data, not the features).

Training: under DDP the loss is ``ClipLoss`` over the batch gathered from every process (each process's
gradient flows through its own pairs; the loss is scaled by the process count so DDP's gradient average
is the full batch's gradient): with :class:`~clipib.roar.RoarDataModule`'s global batch a W-process run takes
the single-process steps. Validation: the embeddings of every validation pair are gathered, put in split
order and scored in fixed groups of ``val_group`` pairs (``val/loss``: mean ``ClipLoss`` over the groups;
``val/i2t_top1`` / ``val/t2i_top1``: retrieval of the pair's own partner within its group), so the numbers do
not depend on batch size or process count. The run's score is written by :class:`clipib.callbacks.roar.RoarScoreWriter`
(added by :meth:`ROARModule.configure_callbacks`).
"""

from __future__ import annotations

from typing import Dict, List, Optional, Union

import torch
import torch.distributed as dist
from lightning import LightningModule
from open_clip.loss import ClipLoss

from clipib.lit.pretrain_module import warmup_cosine
from clipib.models.loading import DEFAULT, load_clip


def group_clip_loss(img: torch.Tensor, txt: torch.Tensor, logit_scale: torch.Tensor, group: int) -> Dict[str, float]:
    """Mean ``ClipLoss`` and pair-retrieval top-1 over consecutive groups of ``group`` pairs (``img``/``txt``
    ``[N, E]`` normalised; a trailing partial group is dropped unless it is the only one).

    >>> e = torch.eye(4)
    >>> r = group_clip_loss(e, e, torch.tensor(100.0), 2)
    >>> round(r["loss"], 4), r["i2t_top1"], r["groups"]
    (0.0, 1.0, 2)
    """
    n = img.shape[0]
    g = min(group, n)
    if g < 2:
        raise ValueError(f"need at least 2 validation pairs, got {n}")
    m = (n // g) * g
    ig, tg = img[:m].reshape(-1, g, img.shape[-1]), txt[:m].reshape(-1, g, txt.shape[-1])  # [G, g, E]
    logits = logit_scale * ig @ tg.transpose(1, 2)  # [G, g_img, g_txt]
    labels = torch.arange(g, device=img.device).expand(logits.shape[0], -1)  # [G, g]
    ce = torch.nn.functional.cross_entropy
    loss = 0.5 * (ce(logits.reshape(-1, g), labels.reshape(-1))  # each image over its group's texts
                  + ce(logits.transpose(1, 2).reshape(-1, g), labels.reshape(-1)))  # each text over the images
    i2t = (logits.argmax(2) == labels).float().mean()
    t2i = (logits.argmax(1) == labels).float().mean()
    return {"loss": float(loss), "i2t_top1": float(i2t), "t2i_top1": float(t2i), "groups": int(logits.shape[0])}


class ROARModule(LightningModule):
    """Fine-tune a CLIP on (degraded) pairs with open_clip's ``ClipLoss``; validate on original pairs.

    Args:
        model, pretrained: :func:`clipib.load_clip`'s (the model the maps were computed on).
        trainable: ``"all"`` (every weight but the temperature), ``"projections"`` (the towers' projections),
            or an int ``k``: the last ``k`` blocks of each tower plus the projections.
        lr, weight_decay, betas, eps: AdamW (no decay on 1-d parameters).
        warmup_steps: linear warm-up steps before the cosine decay to 0 at the last step.
        val_group: validation pairs per ``ClipLoss`` group (fixed, so ``val/loss`` does not depend on batching).
        reference: the reference run (a run directory or its ``roar.json``; the same recipe on undegraded pairs):
            its final ``val/loss`` is ``L_o`` of the score ``(L_c - L_o) / L_o`` (M2IB Sec. 4.4); ``None``: this
            run's loss is written without a score (e.g. it *is* the reference).
    """

    def __init__(self, model: str = "ViT-B-32-quickgelu", pretrained: Optional[str] = DEFAULT,
                 trainable: Union[int, str] = "all", lr: float = 1e-5, weight_decay: float = 0.2,
                 betas: tuple[float, float] = (0.9, 0.98), eps: float = 1e-6, warmup_steps: int = 10,
                 val_group: int = 64, reference: Optional[str] = None) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.clip = load_clip(model, pretrained=pretrained)  # frozen in place, eval mode (kept: no dropout)
        self.trained = self._select(trainable)
        for p in self.trained:
            p.requires_grad_(True)
        self.loss_fn = ClipLoss()
        self._val: List[Dict[str, torch.Tensor]] = []
        self.last_val: Dict[str, float] = {}
        """The last full validation's numbers (``loss``, ``i2t_top1``, ``t2i_top1``, ``pairs``)."""

    def _select(self, trainable: Union[int, str]) -> List[torch.nn.Parameter]:
        """The parameters ``trainable`` names (never the temperature / bias of the logits)."""
        towers = (self.clip.image, self.clip.text)
        proj = [p for t in towers for p in t.projection_parameters()]
        if trainable == "all":
            fixed = {id(p) for n, p in self.clip.model.named_parameters() if n in ("logit_scale", "logit_bias")}
            return [p for p in self.clip.model.parameters() if id(p) not in fixed]
        if trainable == "projections":
            if not proj:
                raise ValueError("trainable='projections': this model's towers have no projection parameters")
            return proj
        if isinstance(trainable, int) and not isinstance(trainable, bool) and trainable >= 1:
            blocks = [p for t in towers for b in list(t.blocks)[-trainable:] for p in b.parameters()]
            return list({id(p): p for p in blocks + proj}.values())
        raise ValueError(f"trainable must be 'all', 'projections' or a number of last blocks >= 1, got {trainable!r}")

    def setup(self, stage: str) -> None:
        """Hand the model's transforms to the data; under DDP the loss gathers the batch from every process."""
        datamodule = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        if hasattr(datamodule, "use_model"):
            datamodule.use_model(self.clip)
        if self._trainer is not None and self.trainer.world_size > 1:
            self.loss_fn = ClipLoss(rank=self.trainer.global_rank, world_size=self.trainer.world_size)

    def configure_callbacks(self) -> list:
        """The score writer (``roar.json``, ``summary.json``, the TensorBoard scalar)."""
        from clipib.callbacks.roar import RoarScoreWriter

        return [RoarScoreWriter()]

    def embed(self, images: torch.Tensor, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """L2-normalised image and text embeddings ``[B, E]`` (text on ids trimmed to the longest caption)."""
        return self.clip.image.encode(images), self.clip.text.encode(ids)

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        """``ClipLoss`` over the (gathered) batch; scaled by the process count for DDP's gradient average."""
        img, txt = self.embed(batch["image"], batch["ids"])
        loss = self.loss_fn(img, txt, self.clip.model.logit_scale.exp())
        self.log("train/loss", loss, prog_bar=True)
        return loss * self.trainer.world_size

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        """Embed the original validation pairs; scored over the whole split at the epoch's end."""
        img, txt = self.embed(batch["image"], batch["ids"])
        self._val.append({"img": img.float(), "txt": txt.float(), "position": batch["position"]})

    def _gathered(self) -> Dict[str, torch.Tensor]:
        """This epoch's validation embeddings from every process, in split order."""
        local = {k: torch.cat([v[k] for v in self._val]) for k in self._val[0]} if self._val else {}
        self._val.clear()
        parts = [local]
        if dist.is_available() and dist.is_initialized() and self.trainer.world_size > 1:
            parts = [None] * self.trainer.world_size
            dist.all_gather_object(parts, {k: v.cpu() for k, v in local.items()})
        parts = [p for p in parts if p]
        cat = {k: torch.cat([p[k].to(self.device) for p in parts]) for k in parts[0]}
        order = cat["position"].argsort()
        return {k: v[order] for k, v in cat.items()}

    def on_validation_epoch_end(self) -> None:
        """Log ``val/loss``, ``val/i2t_top1``, ``val/t2i_top1`` (same value on every process)."""
        if self.trainer.sanity_checking:
            self._val.clear()
            return
        cat = self._gathered()
        scores = group_clip_loss(cat["img"], cat["txt"], self.clip.model.logit_scale.exp().detach(),
                                 self.hparams.val_group)
        self.last_val = {"loss": scores["loss"], "i2t_top1": scores["i2t_top1"], "t2i_top1": scores["t2i_top1"],
                         "pairs": int(cat["img"].shape[0])}
        self.log("val/loss", scores["loss"], prog_bar=True)
        self.log("val/i2t_top1", scores["i2t_top1"])
        self.log("val/t2i_top1", scores["t2i_top1"])

    def configure_optimizers(self) -> dict:
        """AdamW on the trainable parameters (no decay on 1-d ones) + warm-up and cosine decay, per step."""
        hp = self.hparams
        decay = [p for p in self.trained if p.ndim >= 2]
        no_decay = [p for p in self.trained if p.ndim < 2]
        groups = [g for g in ({"params": decay, "weight_decay": hp.weight_decay},
                              {"params": no_decay, "weight_decay": 0.0}) if g["params"]]
        opt = torch.optim.AdamW(groups, lr=hp.lr, betas=tuple(hp.betas), eps=hp.eps)
        sched = warmup_cosine(opt, hp.warmup_steps, int(self.trainer.estimated_stepping_batches))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

