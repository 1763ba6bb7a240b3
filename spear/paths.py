"""Where spear keeps its cache and finds its configs."""

from __future__ import annotations

import os
from pathlib import Path

PACKAGE_DIR = Path(__file__).resolve().parent
PROJECT_ROOT = PACKAGE_DIR.parent
CONF_DIR = PROJECT_ROOT / "conf"


def spear_home() -> Path:
    """The asset and model cache: ``$SPEAR_HOME``, default ``~/.cache/spear``."""
    return Path(os.environ.get("SPEAR_HOME", Path.home() / ".cache" / "spear")).expanduser()
