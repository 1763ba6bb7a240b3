"""``manifest.json`` at the cache root: what each prepared asset is, where it came from, its licence.

Shape::

    {"spear_version": str, "root": str, "updated_at": str,
     "assets": {name: {"path": str (relative to root), "kind": "file"|"dir", "bytes": int,
                       "num_files": int, "sha256": str, "files": {relpath: sha256} (dirs of <= 20 files),
                       "source": {"kind": "pypi"|"debian"|"local", "package", "version", "sha256", ...},
                       "licence": str, "prepared_at": str, "details": {...}}}}

A prepared asset counts as present when its entry exists and the files on disk have the
recorded count and total size (a stat, no hashing); ``verify`` re-hashes.
"""

from __future__ import annotations

import json
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from spear.embedded import ASSET_LAYOUT, MANIFEST
from spear.embedded.sources import hash_tree, tree_stats
from spear.io.atomic import write_json_atomic

MAX_LISTED_FILES = 20


def now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def manifest_path(home: Path) -> Path:
    return Path(home) / MANIFEST


def load_manifest(home: Path) -> dict[str, Any]:
    """The cache manifest, or an empty one when missing or unreadable."""
    from spear import __version__

    path = manifest_path(home)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        if isinstance(data, dict) and isinstance(data.get("assets"), dict):
            return data
    except (OSError, ValueError):
        pass
    return {"spear_version": __version__, "root": str(home), "assets": {}}


def save_manifest(home: Path, manifest: dict[str, Any]) -> Path:
    from spear import __version__

    manifest["spear_version"] = __version__
    manifest["root"] = str(home)
    manifest["updated_at"] = now()
    manifest["assets"] = {k: manifest["assets"][k] for k in sorted(manifest["assets"], key=_layout_order)}
    return write_json_atomic(manifest_path(home), manifest)


def _layout_order(name: str) -> tuple[int, str]:
    names = list(ASSET_LAYOUT)
    return (names.index(name) if name in names else len(names), name)


def make_entry(home: Path, name: str, *, source: dict, licence: str, details: dict | None = None) -> dict[str, Any]:
    """Manifest entry of a freshly prepared asset (hashes its files once)."""
    rel = ASSET_LAYOUT[name]
    path = Path(home) / rel
    digest, files = hash_tree(path)
    count, size = tree_stats(path)
    entry: dict[str, Any] = {
        "path": rel,
        "kind": "dir" if path.is_dir() else "file",
        "bytes": size,
        "num_files": count,
        "sha256": digest,
        "source": source,
        "licence": licence,
        "prepared_at": now(),
        "details": details or {},
    }
    if path.is_dir() and len(files) <= MAX_LISTED_FILES:
        entry["files"] = files
    return entry


def is_present(home: Path, name: str, manifest: dict[str, Any]) -> bool:
    """Entry recorded and the files on disk match its count and size (no hashing)."""
    entry = manifest.get("assets", {}).get(name)
    path = Path(home) / ASSET_LAYOUT[name]
    if not entry or entry.get("path") != ASSET_LAYOUT[name] or not path.exists():
        return False
    return tree_stats(path) == (entry.get("num_files"), entry.get("bytes"))


def verify_entry(home: Path, name: str, manifest: dict[str, Any]) -> bool:
    """Re-hash a prepared asset and compare with its manifest entry."""
    entry = manifest.get("assets", {}).get(name)
    if not is_present(home, name, manifest):
        return False
    return hash_tree(Path(home) / ASSET_LAYOUT[name])[0] == entry.get("sha256")
