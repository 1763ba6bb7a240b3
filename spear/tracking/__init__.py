"""Experiment tracking for the non-training stages (training uses Lightning's loggers).

``logger=wandb`` (offline by default: nothing leaves the machine), ``logger=csv`` or
``logger=none``. The tracker is a thin facade so stages don't branch on the logger kind.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any


class Tracker:
    """No-op base: what ``logger=none`` gives."""

    def log(self, metrics: dict[str, Any]) -> None:  # noqa: B027 - deliberately a no-op
        pass

    def log_table(self, name: str, rows: list[dict[str, Any]]) -> None:  # noqa: B027
        pass

    def log_image(self, name: str, path: Path) -> None:  # noqa: B027
        pass

    def finish(self) -> None:  # noqa: B027
        pass


class CsvTracker(Tracker):
    """Appends scalar metrics to ``<save_dir>/csv/metrics.csv`` (one JSON row per call)."""

    def __init__(self, save_dir: Path) -> None:
        self.path = Path(save_dir) / "csv" / "metrics.csv"
        self.path.parent.mkdir(parents=True, exist_ok=True)

    def log(self, metrics: dict[str, Any]) -> None:
        new = not self.path.exists()
        with open(self.path, "a", newline="") as fh:
            writer = csv.writer(fh)
            if new:
                writer.writerow(["metrics"])
            writer.writerow([json.dumps(metrics, default=str)])


class WandbTracker(Tracker):
    def __init__(self, run) -> None:
        self.run = run

    def log(self, metrics: dict[str, Any]) -> None:
        self.run.log(metrics)

    def log_table(self, name: str, rows: list[dict[str, Any]]) -> None:
        import wandb

        if rows:
            columns = list(rows[0])
            self.run.log({name: wandb.Table(columns=columns, data=[[r.get(c) for c in columns] for r in rows])})

    def log_image(self, name: str, path: Path) -> None:
        import wandb

        self.run.log({name: wandb.Image(str(path))})

    def finish(self) -> None:
        self.run.finish()


def start_tracker(cfg, stage: str) -> Tracker:
    """A tracker for ``cfg.logger`` with the resolved config attached (W&B offline by default)."""
    from omegaconf import OmegaConf

    logger = cfg.get("logger") or {"name": "none"}
    kind = logger.get("name", "none")
    if kind == "none":
        return Tracker()
    if kind == "csv":
        return CsvTracker(Path(logger.get("save_dir", cfg.paths.output_dir)))
    if kind == "wandb":
        import wandb

        run = wandb.init(
            project=logger.get("project", "spear-mm"),
            mode=logger.get("mode", "offline"),
            dir=str(logger.get("save_dir", cfg.paths.output_dir)),
            job_type=stage,
            tags=list(logger.get("tags", [])),
            config=OmegaConf.to_container(cfg, resolve=True),
            reinit="finish_previous",
        )
        return WandbTracker(run)
    from spear.errors import SpearError

    raise SpearError(f"logger.name={kind!r} is unknown; use wandb, csv or none")
