"""Shared plumbing of the Hydra entry points: one-line errors and clean run dirs.

Every stage module exposes ``run(cfg) -> dict`` (callable from tests and the pipeline with a
composed config) and a ``main`` made by :func:`hydra_entry`, which adds Hydra's CLI, turns a
:class:`SpearError` into a one-line message with exit code 2, and removes the run dir when the
failed run left nothing in it but Hydra's own bookkeeping.
"""

from __future__ import annotations

import logging
import os
import shutil
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from spear.errors import SpearError
from spear.paths import CONF_DIR

log = logging.getLogger("spear")

_BOOKKEEPING = {".hydra"}


def _set_offline_defaults() -> None:
    """Nothing leaves the machine unless the user asks: hub offline, W&B offline."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("WANDB_MODE", "offline")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
    os.environ.setdefault("DO_NOT_TRACK", "1")


def _only_bookkeeping(run_dir: Path) -> bool:
    for entry in run_dir.iterdir():
        if entry.name in _BOOKKEEPING or entry.suffix == ".log":
            continue
        return False
    return True


def hydra_entry(config_name: str, run: Callable[[Any], Any]) -> Callable[[], None]:
    """Build the ``main()`` of a stage: Hydra CLI around ``run(cfg)`` with clean failures."""
    import hydra
    from hydra.core.hydra_config import HydraConfig

    @hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name=config_name)
    def _main(cfg) -> None:
        try:
            run(cfg)
        except SpearError as err:
            run_dir = Path(HydraConfig.get().runtime.output_dir)
            logging.shutdown()
            if run_dir.is_dir() and _only_bookkeeping(run_dir):
                shutil.rmtree(run_dir, ignore_errors=True)
            print(f"error: {err}", file=sys.stderr)
            sys.exit(2)

    def main() -> None:
        _set_offline_defaults()
        _main()

    return main


def required_ref(cfg, key: str) -> str:
    """A mandatory model reference (``base``, ``adapted``): a one-line error when unset or empty."""
    from omegaconf import MissingMandatoryValue

    try:
        value = cfg[key]
    except MissingMandatoryValue:
        raise SpearError(f"{key} is required: set {key}=<HF dir, .gguf file or alias>") from None
    if value is None or str(value) == "":
        raise SpearError(f"{key} is empty: set {key}=<HF dir, .gguf file or alias>")
    return str(value)
