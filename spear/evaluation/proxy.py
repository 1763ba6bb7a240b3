"""The general and domain NLL proxies: one evaluator for evaluation, posterior impact and target search.

``proxy`` (:class:`spear.config.schema.ProxyConfig`) names a general-text and a held-out domain corpus
and the sliding-window settings. :class:`ProxyEvaluator` tokenises each corpus once and measures
the mean NLL per token of any model (many times over, for in-memory merges): ``eval`` suites report
it as perplexity, ``impact=posterior`` scores layers by it, ``policy=target_retention`` searches on it.
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any

from spear.errors import SpearError

ROLES = ("general", "domain")


def corpus_path(source: str, key: str) -> Path:
    """The file of a corpus given as an embedded asset name (``general_text``, ...) or a path."""
    from spear.embedded import ASSET_LAYOUT, asset_path

    path = asset_path(source) if source in ASSET_LAYOUT else Path(source).expanduser()
    if not path.is_file():
        assets = ", ".join(k for k in ASSET_LAYOUT if k != "smollm2_135m")
        raise SpearError(f"{key}.source={source!r} is neither an embedded asset ({assets}) nor a text file; fix {key}.source")
    return path


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


def calibration_ids(tokenizer, proxy, role: str, tokens: int, knob: str):
    """The ``tokens`` token ids right after the proxy's evaluation slice of ``role``'s corpus.

    What calibrates a method (``knob`` names its size) therefore never overlaps what evaluates it.
    """
    from spear.evaluation.perplexity import tokenize_corpus

    spec = getattr(proxy, role)
    if spec.max_tokens is None:
        raise SpearError(f"{knob} calibrates on the text after the evaluation slice, but proxy.{role}.max_tokens is null "
                         f"(the whole corpus is evaluated); set proxy.{role}.max_tokens")
    ids = tokenize_corpus(tokenizer, read_corpus(spec.source, f"proxy.{role}"), spec.max_tokens + tokens)
    calib = ids[spec.max_tokens:]
    if calib.numel() < min(tokens, 64):
        raise SpearError(f"proxy.{role}.source has only {ids.numel()} tokens: nothing is left for calibration after the "
                         f"{spec.max_tokens} evaluated ones; lower proxy.{role}.max_tokens or {knob}")
    return calib


class ProxyEvaluator:
    """The proxy corpora of ``roles``, tokenised once for ``tokenizer``; :meth:`measure` any model."""

    def __init__(self, tokenizer, proxy, roles: tuple[str, ...] = ROLES) -> None:
        from spear.evaluation.perplexity import tokenize_corpus

        self.proxy = proxy
        self.specs = {role: getattr(proxy, role) for role in roles}
        self.ids = {
            role: tokenize_corpus(tokenizer, read_corpus(spec.source, f"proxy.{role}"), spec.max_tokens)
            for role, spec in self.specs.items()
        }

    @staticmethod
    def check(proxy) -> None:
        """Fail before any expensive step when a corpus is missing or unreadable."""
        for role in ROLES:
            corpus_path(getattr(proxy, role).source, f"proxy.{role}")

    def measure(self, model, *, name: str = "model", progress: bool = False) -> dict[str, dict[str, Any]]:
        """``{role: {"name", "nll", "ppl", "tokens", "seconds"}}`` of ``model`` (a NaN NLL is an error)."""
        from spear.evaluation.perplexity import corpus_nll_from_ids

        out = {}
        for role, ids in self.ids.items():
            start = time.perf_counter()
            value = corpus_nll_from_ids(model, ids, max_length=self.proxy.max_length, stride=self.proxy.stride,
                                        batch_size=self.proxy.batch_size, progress=progress)
            if not math.isfinite(value["nll"]):
                raise SpearError(f"{name} gives a non-finite NLL on proxy.{role} ({self.specs[role].name}): its weights "
                                 "or activations overflow or hold NaN/Inf; check the model (or load it in float32: model.dtype)")
            out[role] = {"name": self.specs[role].name, **value, "seconds": time.perf_counter() - start}
        return out

    def nll(self, model, *, name: str = "model") -> dict[str, float]:
        """``{role: mean NLL}``: the numbers the posterior and the target search compare."""
        return {role: v["nll"] for role, v in self.measure(model, name=name).items()}
