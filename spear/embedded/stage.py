"""The assets stage: prepare the embedded default assets into ``paths.cache_dir``."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)


def run_assets(cfg) -> dict[str, Any]:
    """Prepare the assets the ``assets`` config selects; a re-run only checks the manifest."""
    from spear.embedded.prepare import prepare_assets
    from spear.paths import spear_home

    home = Path(cfg.paths.cache_dir).expanduser()
    if home.resolve() != spear_home().resolve():
        log.warning("paths.cache_dir=%s differs from $SPEAR_HOME (%s): export SPEAR_HOME=%s so that other stages find these assets",
                    home, spear_home(), home)  # fmt: skip
    return prepare_assets(home, force=cfg.force, verify=cfg.verify, only=cfg.only, local=cfg.local,
                          show_progress=cfg.progress)
