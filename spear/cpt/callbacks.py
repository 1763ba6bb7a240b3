"""Lightning callbacks of the CPT that spear adds (instantiated from ``conf/callbacks``)."""

from __future__ import annotations

import time

import pytorch_lightning as pl


class SpeedMonitor(pl.Callback):
    """Training tokens and the time spent in training steps (validation and checkpoints excluded)."""

    def __init__(self) -> None:
        self.tokens = 0
        self.seconds = 0.0
        self._start: float | None = None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self._start = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self._start is None:
            return
        self.seconds += time.perf_counter() - self._start
        self.tokens += int(batch["input_ids"].numel()) * int(trainer.world_size)
        self._start = None
        if self.seconds > 0:
            pl_module.log("train/tokens_per_s", self.tokens / self.seconds, on_step=True)
