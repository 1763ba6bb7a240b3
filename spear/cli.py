"""Shared plumbing of the Hydra entry points: schema registration, validation, one-line errors.

Every entry point is ``main = hydra_entry("<stage>", "<module>:<function>")``: Hydra composes
``conf/<stage>.yaml`` (the schema's options are registered first), :func:`spear.config.validate`
turns it into the stage's typed run config, and the stage function runs on it. A
:class:`SpearError` becomes one line ``error: ...`` with exit code 2. A run dir that this process
created and that holds nothing but Hydra's bookkeeping afterwards is removed; a dir that existed
before the run (``hydra.run.dir=<existing dir>``) is never removed.
"""

from __future__ import annotations

import importlib
import logging
import os
import shutil
import sys
from collections.abc import Callable
from pathlib import Path

from spear.errors import SpearError
from spear.paths import CONF_DIR

log = logging.getLogger("spear")


def _set_offline_defaults() -> None:
    """Nothing leaves the machine unless the user asks: hub offline, W&B offline."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("WANDB_MODE", "offline")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
    os.environ.setdefault("DO_NOT_TRACK", "1")


def _requested_run_dir(argv: list[str]) -> Path | None:
    """The run dir named on the command line (``hydra.run.dir=...``), when it is a plain path."""
    for arg in argv:
        if arg.startswith("hydra.run.dir="):
            value = arg.split("=", 1)[1]
            return None if "${" in value else Path(value).expanduser().resolve()
    return None


def _remove_if_only_bookkeeping(run_dir: Path, task_name: str) -> None:
    """Remove ``run_dir`` when all it holds is what Hydra wrote for this run (``.hydra/``, the log)."""
    ours = {".hydra", f"{task_name}.log"}
    if run_dir.is_dir() and all(entry.name in ours for entry in run_dir.iterdir()):
        shutil.rmtree(run_dir, ignore_errors=True)


def _stage_function(target: str) -> Callable:
    module, _, name = target.partition(":")
    return getattr(importlib.import_module(module), name)


def hydra_entry(stage: str, target: str) -> Callable[[], None]:
    """The ``main()`` of a stage: Hydra CLI, validation, ``target`` (``module:function``) on the typed config."""
    import hydra
    from hydra.core.hydra_config import HydraConfig

    from spear.config import register, validate

    register()
    preexisting: set[Path] = set()

    @hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name=stage)
    def _main(cfg) -> None:
        run_dir = Path(HydraConfig.get().runtime.output_dir).resolve()
        try:
            _stage_function(target)(validate(cfg, stage))
        except SpearError as err:
            logging.shutdown()
            if run_dir not in preexisting:
                _remove_if_only_bookkeeping(run_dir, str(cfg.task_name))
            print(f"error: {err}", file=sys.stderr)
            sys.exit(2)

    def main() -> None:
        _set_offline_defaults()
        requested = _requested_run_dir(sys.argv[1:])
        if requested is not None and requested.exists():
            preexisting.add(requested)
        _main()

    return main
