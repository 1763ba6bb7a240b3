"""Where a run may write, checked before Hydra writes anything, and the machine's write faults as one line.

A run writes into a new dir, an empty one, or an earlier spear run's (its ``.hydra/`` record says so; the
stages then guard their outputs with ``overwrite``). A dir of the user's files is refused: a run would add
its log and ``.hydra/`` record to it. A path that is a file, or a dir that cannot be written (read-only
mount, immutable flag, permissions), is one line before anything starts rather than a traceback in Hydra.
"""

from __future__ import annotations

import errno
import os
from pathlib import Path

from spear.errors import SpearError

HYDRA_RECORD = ".hydra"
RUN_LOCK = ".spear-run.lock"

NO_SPACE = (errno.ENOSPC, errno.EDQUOT)
NOT_WRITABLE = (errno.EROFS, errno.EACCES, errno.EPERM)


def _existing_ancestor(path: Path) -> Path:
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def check_run_dir(run_dir: Path, key: str = "hydra.run.dir", *, explicit: bool = True) -> None:
    """Refuse a run dir that is a file, cannot be written, or (``explicit``: named by the user) holds files
    no spear run wrote. A timestamped default dir is new by construction: only its writability is checked."""
    run_dir = Path(run_dir).expanduser().resolve()
    anchor = _existing_ancestor(run_dir)
    if not anchor.is_dir():
        where = "is a file" if anchor == run_dir else f"lies under {anchor}, which is a file"
        raise SpearError(f"{key}={run_dir} {where}; choose a directory path")
    if not os.access(anchor, os.W_OK | os.X_OK):
        raise SpearError(f"{key}={run_dir} cannot be written ({anchor} is read-only or not yours); "
                         "make it writable or choose another directory")
    if not explicit or anchor != run_dir or (run_dir / HYDRA_RECORD).is_dir():
        return
    foreign = sorted(p.name for p in run_dir.iterdir() if p.name != RUN_LOCK)
    if foreign:
        shown = ", ".join(foreign[:3]) + (", ..." if len(foreign) > 3 else "")
        raise SpearError(f"{key}={run_dir} holds files no spear run wrote ({shown}); a run would add its log and "
                         "record there: choose a new or empty directory")


def machine_fault(err: BaseException) -> SpearError | None:
    """The one line for an OS write fault (disk full, read-only, no permission); ``None`` for anything else."""
    if not isinstance(err, OSError):
        return None
    where = f" writing {err.filename}" if err.filename else ""
    if err.errno in NO_SPACE:
        return SpearError(f"no space left on the device{where}; free space there, or put the run on another disk "
                          "(hydra.run.dir, paths.log_dir, paths.cache_dir)")
    if err.errno in NOT_WRITABLE:
        return SpearError(f"{os.strerror(err.errno).lower()}{where}; make it writable, or put the run elsewhere "
                          "(hydra.run.dir, paths.log_dir, paths.cache_dir)")
    return None
