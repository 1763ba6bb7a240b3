"""``python -m spear.assets``: fetch and prepare the embedded default assets into the cache.

Writes the assets at the paths of :data:`spear.embedded.ASSET_LAYOUT` under ``paths.cache_dir``
(``$SPEAR_HOME``, default ``~/.cache/spear``) and ``manifest.json`` beside them; a re-run only
checks the manifest. See ``conf/assets.yaml`` for the knobs.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from spear.cli import hydra_entry

log = logging.getLogger(__name__)


def run(cfg) -> dict[str, Any]:
    from omegaconf import OmegaConf

    from spear.embedded.prepare import prepare_assets
    from spear.paths import spear_home

    home = Path(str(cfg.paths.cache_dir)).expanduser()
    if home.resolve() != spear_home().resolve():
        log.warning("paths.cache_dir=%s differs from $SPEAR_HOME (%s): export SPEAR_HOME=%s so that other stages find these assets",
                    home, spear_home(), home)  # fmt: skip
    local = OmegaConf.to_container(cfg.get("local") or {}, resolve=True) or {}
    only = cfg.get("only")
    if isinstance(only, str):
        only = [only]
    return prepare_assets(
        home,
        force=bool(cfg.get("force", False)),
        verify=bool(cfg.get("verify", False)),
        only=list(only) if only else None,
        local=local,
        show_progress=bool(cfg.get("progress", True)),
    )


main = hydra_entry("assets", run)

if __name__ == "__main__":
    main()
