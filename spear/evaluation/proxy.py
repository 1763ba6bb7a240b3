"""The general and domain NLL proxies: one evaluator for evaluation, posterior impact and target search.

``proxy`` (:class:`spear.config.schema.ProxyConfig`) names a general and a held-out domain corpus, the
corpora only reported beside them (``proxy.reported``), and the sliding-window settings. A corpus is
raw text or chat records (:mod:`spear.evaluation.scored`); each has two disjoint parts:

* ``evaluation``: what every evaluation scores (the first ``max_tokens`` tokens of a text; for chat,
  whole records in order until ``max_tokens`` answer tokens, skipping records marked
  ``"split": "calibration"``);
* ``calibration``: what calibrates a method (the fitted policy, posterior and gradient impact,
  the target search): the tokens right after the evaluated ones; for chat, the records marked
  calibration when the file has any, else the records after the evaluated ones.

The two never share a token or a question (checked by :func:`scored_part`).
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any, Literal

from spear.errors import SpearError

ROLES = ("general", "domain")
Part = Literal["evaluation", "calibration"]


def corpus_path(source: str, key: str) -> Path:
    """The file of a corpus given as an embedded asset name (``general_text``, ...) or a path."""
    from spear.embedded import ASSET_LAYOUT, asset_path

    path = asset_path(source) if source in ASSET_LAYOUT else Path(source).expanduser()
    if not path.is_file():
        assets = ", ".join(k for k in ASSET_LAYOUT if k not in ("smollm2_135m", "eval_data"))
        raise SpearError(f"{key}.source={source!r} is neither an embedded asset ({assets}) nor a text file; fix {key}.source")
    return path


def corpus_kind(spec) -> str:
    """``text`` or ``chat``: ``kind=auto`` reads ``.jsonl`` files (and the ``general_chat`` asset) as chat records."""
    if spec.kind != "auto":
        return spec.kind
    return "chat" if spec.source == "general_chat" or str(spec.source).lower().endswith(".jsonl") else "text"


def read_corpus(source: str, key: str) -> str:
    """A corpus' text, strictly UTF-8 (a binary or Latin-1 file is an error, never decoded by guess)."""
    path = corpus_path(source, key)
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise SpearError(f"{key}.source={path} is not UTF-8 text (byte {err.start}); convert it to UTF-8 or choose another file") from None
    if len(text.strip()) < 100:
        raise SpearError(f"{key}.source={path} is (almost) empty; give a text file with some paragraphs")
    return text


def scored_part(tokenizer, spec, key: str, part: Part, tokens: int | None = None, knob: str = ""):
    """The :class:`ScoredText` of one part of a proxy corpus (``tokens``: the calibration part's size,
    named ``knob`` in errors)."""
    from spear.evaluation.perplexity import tokenize_corpus
    from spear.evaluation.scored import ScoredText

    if corpus_kind(spec) == "chat":
        return _chat_part(tokenizer, spec, key, part, tokens, knob)
    if part == "calibration" and spec.max_tokens is None:
        _all_evaluated(key, knob)
    if part == "evaluation":
        return ScoredText.of_text(tokenize_corpus(tokenizer, read_corpus(spec.source, key), spec.max_tokens))
    ids = tokenize_corpus(tokenizer, read_corpus(spec.source, key), spec.max_tokens + tokens)
    calib = ids[spec.max_tokens:]
    if calib.numel() < min(tokens, 64):
        raise SpearError(f"{key}.source has only {ids.numel()} tokens: nothing is left for calibration after the "
                         f"{spec.max_tokens} evaluated ones; lower {key}.max_tokens or {knob}")
    return ScoredText.of_text(calib)


def _all_evaluated(key: str, knob: str) -> None:
    raise SpearError(f"{knob} calibrates on the text after the evaluated part, but {key}.max_tokens is null (the "
                     f"whole corpus is evaluated); set {key}.max_tokens")


def _chat_part(tokenizer, spec, key: str, part: Part, tokens: int | None, knob: str):
    from spear.evaluation.scored import read_chat_records, take_records

    records = read_chat_records(corpus_path(spec.source, key), key)
    pool = [r for r in records if r.get("split") != "calibration"]
    evaluated = take_records(tokenizer, pool, spec.max_tokens, key)
    if part == "evaluation":
        return evaluated
    marked = [r for r in records if r.get("split") == "calibration"]
    if not marked and spec.max_tokens is None:
        _all_evaluated(key, knob)
    rest = marked or pool[len(evaluated.spans):]
    calib = take_records(tokenizer, rest, tokens, key)
    if not calib.spans:
        raise SpearError(f"{key}.source has no records left for calibration after the {len(evaluated.spans)} evaluated "
                         f"ones; lower {key}.max_tokens or add records marked \"split\": \"calibration\"")
    shared = set(evaluated.keys) & set(calib.keys)
    if shared:
        raise SpearError(f"{key}.source: {len(shared)} calibration question(s) are also evaluated ({knob} would "
                         f"calibrate on evaluated text); remove the duplicates from {key}.source")
    return calib


def proxy_texts(proxy) -> dict[str, str]:
    """``{config key: full text}`` of every proxy corpus (chat records as their questions and answers):
    what training must never see."""
    from spear.evaluation.scored import read_chat_records

    specs = {"proxy.general": proxy.general, "proxy.domain": proxy.domain,
             **{f"proxy.reported[{i}]": spec for i, spec in enumerate(proxy.reported)}}
    out = {}
    for key, spec in specs.items():
        if corpus_kind(spec) == "chat":
            records = read_chat_records(corpus_path(spec.source, key), key)
            out[f"{key}.source={spec.source}"] = "\n".join(f"{r['question']}\n{r['answer']}" for r in records)
        else:
            out[f"{key}.source={spec.source}"] = read_corpus(spec.source, key)
    return out


def calibration_text(tokenizer, proxy, role: str, tokens: int, knob: str):
    """The calibration part of ``role``'s corpus (``tokens`` scored tokens; ``knob`` names the size)."""
    return scored_part(tokenizer, getattr(proxy, role), f"proxy.{role}", "calibration", tokens, knob)


def measure_text(model, text, proxy, *, progress: bool = False) -> dict[str, Any]:
    """``{"nll", "ppl", "tokens"[, "stderr", "records"]}`` of a model on one scored text."""
    from spear.evaluation.perplexity import corpus_nll_from_ids
    from spear.evaluation.scored import records_nll

    if text.spans is not None:
        return records_nll(model, text, batch_size=proxy.batch_size)
    return corpus_nll_from_ids(model, text.ids, max_length=proxy.max_length, stride=proxy.stride,
                               batch_size=proxy.batch_size, progress=progress)


class ProxyEvaluator:
    """The proxy corpora of ``roles`` (``general``, ``domain``, and ``reported`` for the corpora of
    ``proxy.reported``), tokenised once for ``tokenizer``; :meth:`measure` any model.

    ``part="calibration"`` measures the calibration parts instead (``calibration_tokens`` each).
    """

    def __init__(self, tokenizer, proxy, roles: tuple[str, ...] = ROLES, part: Part = "evaluation",
                 calibration_tokens: int | None = None, knob: str = "") -> None:
        self.proxy = proxy
        self.specs = {role: getattr(proxy, role) for role in roles if role != "reported"}
        if "reported" in roles:
            self.specs |= {f"reported.{spec.name}": spec for spec in proxy.reported}
        self.texts = {role: scored_part(tokenizer, spec, f"proxy.{role}", part, calibration_tokens, knob)
                      for role, spec in self.specs.items()}

    @staticmethod
    def check(proxy) -> None:
        """Fail before any expensive step when a corpus is missing or unreadable."""
        for role in ROLES:
            corpus_path(getattr(proxy, role).source, f"proxy.{role}")
        for spec in proxy.reported:
            corpus_path(spec.source, "proxy.reported")

    def tokens(self) -> dict[str, int]:
        return {role: text.tokens for role, text in self.texts.items()}

    def measure(self, model, *, name: str = "model", progress: bool = False) -> dict[str, dict[str, Any]]:
        """``{role: {"name", "nll", "ppl", "tokens", "seconds", ...}}`` of ``model`` (a NaN NLL is an error)."""
        out = {}
        for role, text in self.texts.items():
            start = time.perf_counter()
            value = measure_text(model, text, self.proxy, progress=progress)
            if not math.isfinite(value["nll"]):
                raise SpearError(f"{name} gives a non-finite NLL on proxy.{role} ({self.specs[role].name}): its weights "
                                 "or activations overflow or hold NaN/Inf; check the model (or load it in float32: model.dtype)")
            out[role] = {"name": self.specs[role].name, **value, "seconds": time.perf_counter() - start}
        return out

    def nll(self, model, *, name: str = "model") -> dict[str, float]:
        """``{role: mean NLL}``: the numbers the posterior and the target search compare."""
        return {role: v["nll"] for role, v in self.measure(model, name=name).items()}
