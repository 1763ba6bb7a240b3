"""The CPT LightningModule: next-token loss on packed blocks of an HF causal LM.

* loss: the model's shifted cross-entropy with ``labels = input_ids`` (packed blocks, no padding);
  ``train/loss``, ``train/ppl``, ``train/lr`` per step, ``val/loss`` and ``val/ppl`` (exp of the
  mean validation loss over all ranks) per validation run.
* optimizer: AdamW over the trainable parameters only (frozen ones get no optimizer state), no
  weight decay on biases and norms (1-D tensors); linear warmup then cosine decay to
  ``min_lr_ratio * lr`` at ``total_steps``.
* gradient clipping and precision come from the Trainer config (``gradient_clip_val``,
  ``precision``); gradient checkpointing is the HF one with ``use_reentrant=False``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import pytorch_lightning as pl
import torch
from torchmetrics import MeanMetric

from spear.cpt.memory import SavedActivations


def warmup_cosine(step: int, *, warmup_steps: int, total_steps: int, min_lr_ratio: float) -> float:
    """LR multiplier: linear warmup over ``warmup_steps``, then cosine to ``min_lr_ratio``."""
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / warmup_steps
    decay = max(1, total_steps - warmup_steps)
    progress = min(1.0, max(0.0, (step - warmup_steps) / decay))
    return min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """AdamW groups over trainable parameters: decay on matrices, none on biases/norms."""
    decay, no_decay = [], []
    for _, param in model.named_parameters():
        if not param.requires_grad:
            continue
        (decay if param.ndim >= 2 else no_decay).append(param)
    groups = [{"params": decay, "weight_decay": weight_decay}]
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0})
    return groups


def build_optimizer(model: torch.nn.Module, *, lr: float, weight_decay: float, betas: Sequence[float], eps: float):
    """The AdamW both spear and the plain-loop benchmark use."""
    return torch.optim.AdamW(param_groups(model, weight_decay), lr=lr, betas=tuple(betas), eps=eps)


def next_token_loss(model: torch.nn.Module, input_ids: torch.Tensor) -> torch.Tensor:
    return model(input_ids=input_ids, labels=input_ids, use_cache=False).loss


class CPTModule(pl.LightningModule):
    """Continual pretraining of ``model`` (an HF causal LM whose frozen params are already set)."""

    def __init__(self, model: torch.nn.Module, *, optim, total_steps: int, gradient_checkpointing: bool = False) -> None:
        """``optim``: the validated ``optim`` config; ``total_steps``: the LR schedule's length."""
        super().__init__()
        self.save_hyperparameters({**optim.model_dump(mode="json"), "total_steps": int(total_steps),
                                   "gradient_checkpointing": bool(gradient_checkpointing)})
        self.model = model
        self.model.train()
        if hasattr(self.model, "config"):
            self.model.config.use_cache = False
        if gradient_checkpointing:
            self.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        self.val_loss = MeanMetric()
        self.tokens_seen = 0  # this rank's training tokens (restored on resume)
        self.batches_seen = 0  # this rank's training batches: the data loader's resume position
        self.activation_bytes: int | None = None  # saved for backward by one batch (spear.cpt.memory)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return next_token_loss(self.model, input_ids)

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        input_ids = batch["input_ids"]
        if self.activation_bytes is None:  # the first batch: count what autograd keeps for backward
            saved = SavedActivations(self.model)
            with saved.counting():
                loss = self(input_ids)
            self.activation_bytes = saved.bytes
        else:
            loss = self(input_ids)
        self.tokens_seen += input_ids.numel()
        self.batches_seen += 1
        # the mean over ranks (a no-op on one process), so a DDP run logs the loss of its global batch
        self.log("train/loss", loss, on_step=True, prog_bar=True, batch_size=input_ids.shape[0], sync_dist=True)
        self.log("train/ppl", torch.exp(loss.detach().float()), on_step=True, batch_size=input_ids.shape[0])
        return loss

    def on_train_batch_end(self, outputs, batch, batch_idx: int) -> None:
        opt = self.optimizers(use_pl_optimizer=False)
        self.log("train/lr", opt.param_groups[0]["lr"], on_step=True)

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        loss = self(batch["input_ids"])
        self.val_loss.update(loss.detach().float(), weight=batch["input_ids"].shape[0])

    def on_validation_epoch_end(self) -> None:
        if self.val_loss.update_count == 0:
            return
        mean = self.val_loss.compute()
        self.val_loss.reset()
        self.log("val/loss", mean, prog_bar=True)
        self.log("val/ppl", torch.exp(mean))

    def configure_optimizers(self):
        hp = self.hparams
        optimizer = build_optimizer(self.model, lr=hp.lr, weight_decay=hp.weight_decay, betas=hp.betas, eps=hp.eps)
        schedule = lambda step: warmup_cosine(  # noqa: E731
            step, warmup_steps=hp.warmup_steps, total_steps=hp.total_steps, min_lr_ratio=hp.min_lr_ratio
        )
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step", "frequency": 1}}

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["spear_tokens_seen"] = int(self.tokens_seen)
        checkpoint["spear_batches_seen"] = int(self.batches_seen)

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self.tokens_seen = int(checkpoint.get("spear_tokens_seen", 0))
        self.batches_seen = int(checkpoint.get("spear_batches_seen", 0))
