"""Shared fixtures: config composition without a Hydra run, and tiny model dirs."""

from __future__ import annotations

import os
import random
import shutil
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture
def compose(tmp_path):
    """compose(stage, overrides) -> the stage's validated run config, ``paths.output_dir`` in tmp_path."""
    from spear.config import compose as compose_stage

    def _compose(config_name: str, overrides: list[str] | None = None, output_dir: Path | None = None):
        out = output_dir or (tmp_path / "run")
        return compose_stage(config_name, [f"paths.output_dir={out}", "logger=none", *(overrides or [])])

    return _compose


@pytest.fixture(scope="session")
def word_corpus(tmp_path_factory):
    """word_corpus(lines, seed) -> a text file of ``lines`` random 16-word lines of finance words: enough
    structure for a loss to fall, nothing to download."""
    words = "ledger account balance credit debit asset liability equity income expense invoice loan".split()

    def _write(lines: int, seed: int) -> Path:
        rng = random.Random(seed)
        path = tmp_path_factory.mktemp("corpus") / "finance.txt"
        path.write_text("\n".join(" ".join(rng.choice(words) for _ in range(16)) for _ in range(lines)))
        return path

    return _write


@pytest.fixture(scope="session")
def corpus(tmp_path_factory) -> Path:
    """A small finance-word corpus of 40 paragraphs: the tiny pipeline runs' CPT text."""
    rng = random.Random(0)
    words = "ledger account debit credit balance asset liability equity income expense invoice loan".split()
    path = tmp_path_factory.mktemp("corpus") / "finance.txt"
    path.write_text("\n\n".join(" ".join(rng.choice(words) for _ in range(60)) for _ in range(40)))
    return path


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory) -> Path:
    """A saved random tiny Llama (HF safetensors dir + byte tokenizer); copy before mutating."""
    from spear.models.tiny import save_tiny

    return save_tiny("tiny_llama", tmp_path_factory.mktemp("tiny_llama") / "model")


@pytest.fixture
def tiny_llama_copy(tiny_llama_dir, tmp_path) -> Path:
    dest = tmp_path / "tiny_llama"
    shutil.copytree(tiny_llama_dir, dest)
    return dest
