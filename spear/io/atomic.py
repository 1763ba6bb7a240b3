"""Atomic outputs: write into a temporary sibling, rename at the end; one writer per output.

An interrupted stage then leaves either the complete output or nothing (plus a hidden
``.tmp-*`` sibling that the next run of the same output removes), never a half-written one.
A writer holds the hidden lock file ``.<name>.lock`` beside the output (an OS lock, released
when its process ends, so a dead owner's lock is free): a second writer fails fast naming the
owner's pid, and stale temp dirs are removed only by the lock's holder, never from a live writer.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from spear.errors import SpearError

TMP_PREFIX = ".tmp-"


def _remove(path: Path) -> None:
    """Remove a leftover of this module's own: a symlink goes as a link (never what it points to)."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def _clear_stale_tmp(final: Path) -> None:
    for stale in final.parent.glob(f"{TMP_PREFIX}{final.name}-*"):
        _remove(stale)


def _lock_path(final: Path) -> Path:
    return final.parent / f".{final.name}.lock"


@contextlib.contextmanager
def exclusive(final: Path, *, wait: bool = False, what: str = "hydra.run.dir", lock: Path | None = None) -> Iterator[None]:
    """Hold ``final``'s lock for the block: fail fast when another process holds it, or ``wait`` for it.

    The lock file is ``.<name>.lock`` beside ``final`` unless ``lock`` names another one.
    """
    from filelock import FileLock, Timeout

    final = Path(final)
    path = Path(lock) if lock is not None else _lock_path(final)
    path.parent.mkdir(parents=True, exist_ok=True)
    file_lock = FileLock(path, timeout=-1 if wait else 0)
    try:
        file_lock.acquire()
    except Timeout:
        owner = path.read_text().strip() if path.exists() else "?"
        raise SpearError(f"{final} is being written by pid {owner or '?'}; wait for it or choose another {what}") from None
    try:
        path.write_text(f"{os.getpid()}\n")  # the same inode the OS lock is on: tells a second writer who holds it
        yield
    finally:
        file_lock.release()


def check_completed(output: Path, marker: Path, overwrite: bool) -> None:
    """``output`` without the ``marker`` its stage writes last: an earlier run was killed in between."""
    if Path(output).exists() and not Path(marker).exists() and not overwrite:
        raise SpearError(f"{output} exists but {Path(marker).name} does not: an earlier run was interrupted after writing "
                         "it; set overwrite=true to redo that run here, or choose another run dir")


def check_output_free(final: Path, overwrite: bool, knob: str = "overwrite") -> None:
    """An existing output is an error unless ``overwrite``: stages call it before their expensive work."""
    if Path(final).exists() and not overwrite:
        raise SpearError(f"output {final} already exists; set {knob}=true to replace it, or choose another run dir")


@contextlib.contextmanager
def atomic_dir(final: Path, overwrite: bool = False, knob: str = "overwrite") -> Iterator[Path]:
    """Yield a temp dir that becomes ``final`` when the block succeeds.

    An existing ``final`` is an error unless ``overwrite`` (the message names the ``knob``);
    with ``overwrite`` it is replaced only after the new output is complete.
    """
    final = Path(final)
    check_output_free(final, overwrite, knob)
    with exclusive(final):
        check_output_free(final, overwrite, knob)  # another writer may have finished it meanwhile
        _clear_stale_tmp(final)  # we hold the lock: these are a dead or finished writer's leftovers
        tmp = Path(tempfile.mkdtemp(prefix=f"{TMP_PREFIX}{final.name}-", dir=final.parent))
        os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp creates 0700; the output gets the usual dir mode
        try:
            yield tmp
            if final.exists():
                backup = final.with_name(f"{TMP_PREFIX}{final.name}-old")
                os.replace(final, backup)
                os.replace(tmp, final)
                _remove(backup)  # a symlinked output: the link is replaced, its target left as it was
            else:
                os.replace(tmp, final)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_text_atomic(path: Path, text: str) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f"{TMP_PREFIX}{path.name}-", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp creates 0600; give the usual file mode
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def write_json_atomic(path: Path, obj: Any) -> Path:
    """Strict JSON (a NaN is an error: store ``None``), indented, written atomically."""
    return write_text_atomic(path, json.dumps(obj, indent=2, allow_nan=False) + "\n")
