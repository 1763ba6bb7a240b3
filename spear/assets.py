"""``python -m spear.assets``: fetch and prepare the embedded default assets (SPEC §3) into the cache
(``paths.cache_dir``) and record them in its ``manifest.json``. The stage: :mod:`spear.embedded.stage`."""

from spear.cli import hydra_entry

main = hydra_entry("assets", "spear.embedded.stage:run_assets")

if __name__ == "__main__":
    main()
