"""Content-addressed stage artifacts: a pipeline sweep never repeats an unchanged stage, nor reuses a damaged one.

A stage's key is the sha256 of its resolved config slice plus fingerprints of its input files. Its outputs
live in an entry dir, ``<root>/<stage>/<key>/`` (later entries of the key ``<key>-2``, ``<key>-3``, ...),
and count as present only once the stage wrote the entry's record ``done.json`` (last, atomically), so an
interrupted stage is recomputed in its own entry. The record holds the stage's result, the result's sha256,
and the size and sha256 of every file the stage wrote into the entry (hidden files, its locks, aside).
Reuse verifies them all, streamed (:func:`verify_entry`): a record that does not parse, a missing file or
a changed one is one warning line, and the stage is recomputed into a fresh entry. The damaged entry is
left as it is, never used, and never the reason a run stops. ``pipeline.force`` names stages to recompute
into fresh entries on purpose, once per command: an entry written since the command started (``since``:
by this run, or by another job of its sweep) is reused.

Concurrent runs sharing a cache (a parallel sweep) compute each key once: :meth:`StageCache.claim` holds
the key's lock, so a second job waits for the owner's result and reuses it (a dead owner's lock is released
with its process).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from spear.io.atomic import exclusive, write_json_atomic
from spear.io.hashing import file_sha256

log = logging.getLogger(__name__)

DONE = "done.json"
FORMAT = 2  # records with file hashes; 1 (no "format") held only the result


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


def result_sha256(result: Any) -> str:
    """sha256 of a result as canonical JSON: a record edited in place no longer matches it."""
    return hashlib.sha256(json.dumps(result, sort_keys=True, separators=(",", ":"), allow_nan=False).encode()).hexdigest()


def written_files(entry_dir: Path) -> dict[str, dict[str, Any]]:
    """``relative path -> {size, sha256}`` of every regular file of an entry but its record, hidden
    names (locks, temp files) and links; each file is hashed streamed."""
    files = {}
    for path in sorted(Path(entry_dir).rglob("*")):
        rel = path.relative_to(entry_dir)
        if rel.as_posix() == DONE or any(part.startswith(".") for part in rel.parts) or path.is_symlink() or not path.is_file():
            continue
        files[rel.as_posix()] = {"size": path.stat().st_size, "sha256": file_sha256(path)}
    return files


def read_record(entry_dir: Path) -> tuple[dict[str, Any] | None, str | None]:
    """(the entry's record, None), or (None, what is wrong with it): unreadable, or without file hashes."""
    try:
        record = json.loads((Path(entry_dir) / DONE).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as err:
        return None, f"its {DONE} is unreadable ({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''})"
    if not (isinstance(record, dict) and record.get("format") == FORMAT and isinstance(record.get("files"), dict)):
        return None, f"its {DONE} is not a record with file hashes (an older spear wrote it, or it was edited)"
    return record, None


def verify_entry(entry_dir: Path, record: dict[str, Any]) -> str | None:
    """What is wrong with a complete entry (its result altered, a file missing or changed), or None."""
    try:
        if result_sha256(record["result"]) != record["result_sha256"]:
            return f"the result in its {DONE} does not match its sha256"
        for rel, expected in record["files"].items():
            path = Path(entry_dir) / rel
            if not path.is_file():
                return f"{rel} is missing"
            if path.stat().st_size != expected["size"] or file_sha256(path) != expected["sha256"]:
                return f"{rel} changed since it was written (sha256 mismatch)"
    except (KeyError, TypeError, ValueError) as err:
        return f"its {DONE} is malformed ({type(err).__name__}: {err})"
    except OSError as err:
        return f"a file cannot be read ({err})"
    return None


@dataclass
class CacheEntry:
    """One entry of a stage's key: where the stage writes, and its verified result once there is one."""

    stage: str
    key: str
    dir: Path
    result: dict[str, Any] | None = None
    files: dict[str, dict[str, Any]] = field(default_factory=dict)

    def complete(self, result: dict[str, Any]) -> dict[str, Any]:
        """Record ``result`` and the hashes of every file the stage wrote here; the entry is then reusable."""
        self.files = written_files(self.dir) if self.dir.is_dir() else {}
        write_json_atomic(self.dir / DONE, {"format": FORMAT, "stage": self.stage, "key": self.key, "files": self.files,
                                            "result_sha256": result_sha256(result), "result": result})
        self.result = result
        return result

    def digest(self, under: Path) -> str:
        """A key of the content of the entry's files under ``under``, so later stages key on what they read; the
        Markdown there (a model card: timings, paths) is not content."""
        prefix = Path(under).resolve().relative_to(self.dir.resolve()).as_posix() + "/"
        return content_key(sorted((rel[len(prefix):], f["sha256"]) for rel, f in self.files.items()
                                  if rel.startswith(prefix) and not rel.endswith(".md")))


@dataclass
class StageCache:
    """Where stage outputs live, which stages ``force`` recomputes (entries written before ``since``, when the
    command started), and a record of which were reused."""

    root: Path
    force: frozenset[str] = frozenset()
    since: float = field(default_factory=time.time)
    events: list[dict[str, Any]] = field(default_factory=list)

    def entries(self, stage: str, key: str) -> list[Path]:
        """The key's entry dirs that exist, oldest first (``<key>``, ``<key>-2``, ...)."""
        first = Path(self.root) / stage / key
        later = [p for p in first.parent.glob(f"{key}-*") if p.name[len(key) + 1:].isdigit()]
        return [first] * first.exists() + sorted(later, key=lambda p: int(p.name[len(key) + 1:]))

    @contextlib.contextmanager
    def claim(self, stage: str, key: str) -> Iterator[CacheEntry]:
        """Hold ``key``'s lock for the block; the entry has the verified stored result or, without one, the dir
        to compute into (then :meth:`CacheEntry.complete` it inside the block)."""
        with exclusive(Path(self.root) / stage / key, wait=True, what="pipeline.cache_dir"):
            yield self._open(stage, key)

    def _open(self, stage: str, key: str) -> CacheEntry:
        """The newest complete entry of the key when it is intact (and not forced); else where to compute: the
        newest entry when it is this cache's own interrupted attempt, or a fresh one."""
        entries = self.entries(stage, key)
        event: dict[str, Any] = {"stage": stage, "key": key, "hit": False}
        self.events.append(event)
        pending = entries[-1] if entries and entries[-1].is_dir() and not (entries[-1] / DONE).exists() else None
        target = pending or _next_entry(Path(self.root) / stage / key, entries)
        complete = [p for p in entries if p != pending]
        if not complete:
            return CacheEntry(stage, key, target)
        newest = complete[-1]
        record, problem = read_record(newest)
        if record is not None and stage in self.force and (newest / DONE).stat().st_mtime <= self.since:
            log.info("stage cache: pipeline.force recomputes %s %s into %s", stage, key, target.name)
            event["recomputed"] = "pipeline.force"
            return CacheEntry(stage, key, target)
        problem = problem or verify_entry(newest, record)
        if problem is None:
            event["hit"] = True
            return CacheEntry(stage, key, newest, record["result"], record["files"])
        log.warning("stage cache: the %s entry %s is damaged: %s; recomputing it into %s (the damaged entry is left as it is)",
                    stage, newest, problem, target.name)
        event["recomputed"] = problem
        return CacheEntry(stage, key, target)


def _next_entry(first: Path, entries: list[Path]) -> Path:
    """The key's first entry dir when it has none, else the one after its newest (``<key>-<n+1>``)."""
    if not entries:
        return first
    newest = entries[-1].name
    number = 1 if newest == first.name else int(newest[len(first.name) + 1:])
    return first.with_name(f"{first.name}-{number + 1}")
