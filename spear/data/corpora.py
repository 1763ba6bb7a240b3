"""Training corpora: which files, and the documents in them.

A corpus is a list of entries, each one of

* a text file (``*.txt``, ``*.md``, anything not JSONL): one document per file, or one per
  piece when ``doc_separator`` (a regex) splits it;
* a JSONL file (``*.jsonl`` / ``*.json`` lines, or any file with ``format=jsonl``): one document
  per line, the text under ``text_field``;
* a glob (``data/**/*.txt``) or a directory (every file under it, recursively);
* ``asset:<name>``: an embedded asset of :mod:`spear.embedded` (``asset:finance_train``).

Files are read in a fixed order (entries as given, globs and directories sorted), so the same
config always gives the same token stream. A corpus without text, or one that cannot be read,
is a :class:`SpearError` that names the file and the ``data.*`` key to change.
"""

from __future__ import annotations

import glob
import hashlib
import json
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from spear.errors import SpearError

FORMATS = ("auto", "text", "jsonl")
JSONL_SUFFIXES = (".jsonl", ".json", ".ndjson")
ASSET_PREFIX = "asset:"


@dataclass(frozen=True)
class CorpusFile:
    """One file of a corpus and how to read it."""

    path: Path
    format: str  # "text" or "jsonl"


def _file_format(path: Path, fmt: str) -> str:
    if fmt not in FORMATS:
        raise SpearError(f"data.format={fmt!r} is not one of {', '.join(FORMATS)}")
    if fmt != "auto":
        return fmt
    return "jsonl" if path.suffix.lower() in JSONL_SUFFIXES else "text"


def _expand(entry: str) -> list[Path]:
    if entry.startswith(ASSET_PREFIX):
        from spear.embedded import asset_path

        return _expand(str(asset_path(entry[len(ASSET_PREFIX) :])))
    path = Path(entry).expanduser()
    if path.is_file():
        return [path]
    if path.is_dir():
        return sorted(p for p in path.rglob("*") if p.is_file() and not p.name.startswith("."))
    if glob.has_magic(entry):
        return sorted(Path(p) for p in glob.glob(str(Path(entry).expanduser()), recursive=True) if Path(p).is_file())
    raise SpearError(f"corpus entry {entry!r} does not exist; fix data.paths (files, globs, dirs or asset:<name>)")


def resolve_corpus(paths: str | Sequence[str], fmt: str = "auto") -> list[CorpusFile]:
    """The files of a corpus, in reading order (duplicates dropped)."""
    if isinstance(paths, str):
        paths = [paths]
    if not paths:
        raise SpearError("data.paths is empty; give at least one text/JSONL file, glob, dir or asset:<name>")
    files: list[CorpusFile] = []
    seen: set[Path] = set()
    for entry in paths:
        matched = _expand(str(entry))
        if not matched:
            raise SpearError(f"corpus entry {entry!r} matched no files; fix data.paths")
        for path in matched:
            key = path.resolve()
            if key not in seen:
                seen.add(key)
                files.append(CorpusFile(path, _file_format(path, fmt)))
    return files


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise SpearError(f"corpus file {path} is not UTF-8 text ({err.reason} at byte {err.start}); convert it or drop it from data.paths") from None
    except OSError as err:
        raise SpearError(f"corpus file {path} cannot be read ({err.strerror}); fix its permissions or data.paths") from None


def iter_documents(
    files: Sequence[CorpusFile], *, text_field: str = "text", doc_separator: str | None = None
) -> Iterator[str]:
    """Documents of a corpus in reading order (empty ones skipped)."""
    splitter = re.compile(doc_separator) if doc_separator else None
    for cf in files:
        text = _read_text(cf.path)
        if cf.format == "text":
            pieces = splitter.split(text) if splitter else [text]
            for piece in pieces:
                if piece.strip():
                    yield piece
            continue
        for lineno, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise SpearError(f"{cf.path}:{lineno} is not valid JSON ({err.msg}); fix the file or set data.format=text") from None
            if not isinstance(record, dict) or text_field not in record:
                raise SpearError(f"{cf.path}:{lineno} has no field {text_field!r}; set data.text_field to the field holding the text")
            value = record[text_field]
            if not isinstance(value, str):
                raise SpearError(f"{cf.path}:{lineno} field {text_field!r} is {type(value).__name__}, not text; fix data.text_field")
            if value.strip():
                yield value


def corpus_fingerprint(files: Sequence[CorpusFile], **options) -> str:
    """sha256 of the corpus content (bytes of every file, in order) and the reading options."""
    digest = hashlib.sha256()
    digest.update(json.dumps(options, sort_keys=True, default=str).encode())
    for cf in files:
        digest.update(f"\0{cf.format}\0".encode())
        try:
            with open(cf.path, "rb") as fh:
                for chunk in iter(lambda fh=fh: fh.read(1 << 22), b""):
                    digest.update(chunk)
        except OSError as err:
            raise SpearError(f"corpus file {cf.path} cannot be read ({err.strerror}); fix its permissions or data.paths") from None
    return digest.hexdigest()
