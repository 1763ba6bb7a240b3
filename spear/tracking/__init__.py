"""Experiment tracking for every stage through the configured Lightning logger (``logger`` group).

``logger=wandb`` (offline by default: nothing leaves the machine), ``logger=csv`` or ``logger=none``
are ``_target_`` nodes of Lightning loggers; training hands the instance to the Trainer, the other
stages log through :class:`Tracker`, a thin facade over the same instance, so no stage branches on
the logger kind.
"""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any


def build_logger(logger_cfg: dict[str, Any] | None):
    """The Lightning logger of a ``logger`` node, or ``False`` (no logger) for ``logger=none``."""
    if not logger_cfg:
        return False
    from hydra.utils import instantiate

    return instantiate(logger_cfg)


def finish_logger(logger) -> None:
    """Close the logger's run, so that a later stage in the same process starts its own."""
    if not logger:
        return
    logger.finalize("success")
    run = getattr(logger, "_experiment", None)  # WandbLogger: the wandb run, when one was started
    if run is not None and hasattr(run, "finish"):
        run.finish()


class Tracker:
    """Scalars, tables and images of one stage run, on the configured logger (a no-op without one)."""

    def __init__(self, logger, config: dict[str, Any] | None = None) -> None:
        self.logger = logger
        if logger and config is not None:
            logger.log_hyperparams(config)

    def log(self, metrics: dict[str, Any]) -> None:
        numbers = {k: float(v) for k, v in metrics.items() if isinstance(v, int | float) and not isinstance(v, bool)}
        if self.logger and numbers:
            self.logger.log_metrics(numbers)

    def log_table(self, name: str, rows: list[dict[str, Any]]) -> None:
        if not (self.logger and rows):
            return
        columns = list(rows[0])
        if hasattr(self.logger, "log_table"):  # W&B: a native table
            self.logger.log_table(key=name, columns=columns, data=[[r.get(c) for c in columns] for r in rows])
            return
        path = Path(self.logger.log_dir) / f"{name.replace('/', '_')}.csv"
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "w", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=columns, extrasaction="ignore")
            writer.writeheader()
            writer.writerows(rows)

    def log_image(self, name: str, path: Path) -> None:
        if self.logger and hasattr(self.logger, "log_image"):
            self.logger.log_image(key=name, images=[str(path)])

    def finish(self) -> None:
        finish_logger(self.logger)


def start_tracker(cfg) -> Tracker:
    """A tracker for ``cfg.logger`` with the run's resolved config attached."""
    return Tracker(build_logger(cfg.logger), cfg.model_dump(mode="json"))
