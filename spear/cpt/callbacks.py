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


class ProgressLog(pl.Callback):
    """One log line every ``interval_s`` seconds (step, loss, tokens/s, ETA) when no progress bar shows:
    stdout is not a terminal (a log file, a batch job) or ``trainer.enable_progress_bar=false``."""

    def __init__(self, interval_s: float = 30.0) -> None:
        self.interval_s = interval_s
        self._t0: float | None = None
        self._last = 0.0
        self._tokens = 0

    def _active(self, trainer) -> bool:
        import sys

        return trainer.is_global_zero and (not sys.stdout.isatty() or not trainer.progress_bar_callback)

    def on_train_start(self, trainer, pl_module) -> None:
        self._t0 = self._last = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        import logging

        self._tokens += int(batch["input_ids"].numel()) * int(trainer.world_size)
        now = time.perf_counter()
        if self._t0 is None or now - self._last < self.interval_s or not self._active(trainer):
            return
        self._last = now
        step, total = trainer.global_step, trainer.max_steps if trainer.max_steps and trainer.max_steps > 0 else None
        elapsed = now - self._t0
        loss = trainer.callback_metrics.get("train/loss")
        eta = f", ETA {elapsed / max(step, 1) * (total - step):.0f}s" if total and step else ""
        logging.getLogger("spear.cpt").info(
            "step %d%s, loss %s, %.0f tokens/s, %.0fs elapsed%s", step, f"/{total}" if total else "",
            f"{float(loss):.4f}" if loss is not None else "n/a", self._tokens / elapsed, elapsed, eta)
