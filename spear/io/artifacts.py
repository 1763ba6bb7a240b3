"""Content-addressed stage artifacts, so a pipeline sweep never repeats an unchanged stage.

A stage's key is the sha256 of its resolved config slice plus fingerprints of its input
files. Its outputs live in ``<root>/<stage>/<key>/`` and count as present only once the
stage wrote ``done.json`` there (written last, atomically), so an interrupted stage is
simply recomputed. Concurrent runs sharing a cache (a parallel sweep) compute each key once:
:meth:`StageCache.claim` holds the key's lock, so a second job waits for the owner's result and
reuses it (a dead owner's lock is released with its process).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from spear.io.atomic import exclusive, write_json_atomic

DONE = "done.json"


def fingerprint_path(path: Path) -> list[Any]:
    """Cheap identity of a file or dir: relative names, sizes and mtimes of its files."""
    path = Path(path)
    if path.is_file():
        st = path.stat()
        return [path.name, st.st_size, st.st_mtime_ns]
    return [
        [str(p.relative_to(path)), p.stat().st_size, p.stat().st_mtime_ns]
        for p in sorted(path.rglob("*"))
        if p.is_file() and not p.name.startswith(".")
    ]


def content_key(*parts: Any) -> str:
    """Stable 16-hex key of JSON-serialisable parts (configs, fingerprints)."""
    blob = json.dumps(parts, sort_keys=True, default=str, separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


@dataclass
class StageCache:
    """Where stage outputs live, and a record of which stages were reused."""

    root: Path
    events: list[dict[str, Any]] = field(default_factory=list)

    def dir_for(self, stage: str, key: str) -> Path:
        return Path(self.root) / stage / key

    def lookup(self, stage: str, key: str) -> dict[str, Any] | None:
        """The stored result of a completed stage, or ``None``; the hit or miss is recorded."""
        done = self.dir_for(stage, key) / DONE
        result = json.loads(done.read_text()) if done.exists() else None
        self.events.append({"stage": stage, "key": key, "hit": result is not None})
        return result

    @contextlib.contextmanager
    def claim(self, stage: str, key: str) -> Iterator[None]:
        """Hold ``key``'s lock: look it up and, if missing, compute and :meth:`complete` it inside."""
        with exclusive(self.dir_for(stage, key), wait=True, what="pipeline.cache_dir"):
            yield

    def complete(self, stage: str, key: str, result: dict[str, Any]) -> dict[str, Any]:
        write_json_atomic(self.dir_for(stage, key) / DONE, result)
        return result
