"""Retention and domain-gain preservation (SPEC §1.6): pure functions on results dicts.

Orientation: every number is turned into "higher is better" before it is compared, so that a
retention above 1 always means *better than the base*, never an accident of the metric's sign.

- score-type metric (accuracy, exact match; higher is better):
  ``retention = score(model) / score(base)``
- loss-type metric (mean NLL per token of a perplexity corpus, bits per byte; lower is better):
  ``retention = nll(base) / nll(model)`` -- a model that got worse on general text has a larger
  NLL, hence retention < 1, exactly like a lost accuracy point. NLL, not perplexity: the ratio
  of perplexities is ``exp`` of an NLL difference and exaggerates small changes.
- domain gain preservation, per domain entry:
  ``G = (s(model) - s(base)) / (s(adapted) - s(base))`` with ``s = score`` or ``s = -nll``,
  i.e. for NLL ``G = (nll(base) - nll(model)) / (nll(base) - nll(adapted))``:
  the adapted model -> 1, the base model -> 0, halfway -> 0.5.
  A zero gain (``|s(adapted) - s(base)| <= min_gain``) gives ``None`` and a warning, never a
  division error; a negative gain (CPT made the domain worse) is reported with a warning.

Aggregates: ``general_retention`` = mean retention over the general entries (the suite's
``general_tasks`` and ``general_corpora``); ``domain_gain_preservation`` = mean ``G`` over the
domain entries (``domain_tasks`` and ``domain_corpora``) where ``G`` is defined.

A noisy score must not decide a headline number: a task whose standard error exceeds
``max_relative_stderr`` of the base model's score (ARC-Easy at 200 questions: 0.035 of 0.50, 7%)
keeps its own retention but stays out of the aggregates (``left_out``), unless nothing else of its
kind is measured.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable, Mapping
from typing import Any

from spear.errors import SpearError

log = logging.getLogger(__name__)

LOWER_IS_BETTER = {"bits_per_byte", "byte_perplexity", "word_perplexity", "perplexity", "nll", "ppl"}


def _finite(x: Any) -> bool:
    return isinstance(x, int | float) and not isinstance(x, bool) and math.isfinite(x)


def retention(model: float | None, base: float | None, *, lower_is_better: bool = False, label: str = "") -> float | None:
    """``model/base`` for a score, ``base/model`` for a loss; ``None`` (logged) when undefined."""
    if not (_finite(model) and _finite(base)):
        return None
    num, den = (base, model) if lower_is_better else (model, base)
    if den == 0:
        log.warning("retention of %s is undefined: %s is 0", label or "a metric", "model" if lower_is_better else "base")
        return None
    return num / den


def gain_preservation(
    model: float | None,
    base: float | None,
    adapted: float | None,
    *,
    lower_is_better: bool = False,
    min_gain: float = 0.0,
    label: str = "",
) -> float | None:
    """``G = (s(model) - s(base)) / (s(adapted) - s(base))`` with ``s = -value`` for losses."""
    if not (_finite(model) and _finite(base) and _finite(adapted)):
        return None
    sign = -1.0 if lower_is_better else 1.0
    gain = sign * (adapted - base)
    if abs(gain) <= min_gain:
        log.warning(
            "domain gain preservation of %s is undefined: the adapted model gained %.3g over the base "
            "(at most min_domain_gain=%g)", label or "a metric", gain, min_gain,
        )
        return None
    if gain < 0:
        log.warning("%s: the adapted model is worse than the base on this domain metric (gain %.3g); G is not meaningful",
                    label or "a metric", gain)
    return sign * (model - base) / gain


def _mean(values: Iterable[float | None]) -> float | None:
    vals = [v for v in values if v is not None]
    return sum(vals) / len(vals) if vals else None


def task_value(results: Mapping[str, Any], task: str, metric: str) -> float | None:
    return (results.get("tasks", {}).get(task) or {}).get(metric)


def binomial_se(p: float | None, n: int | None) -> float | None:
    """Standard error of an accuracy over ``n`` samples: lm-eval leaves it out when not bootstrapping."""
    if p is None or not n or not 0 <= p <= 1:
        return None
    return math.sqrt(p * (1 - p) / n)


def stderr_key(metric: str) -> str:
    """lm-eval's name for a metric's stderr: the suffix goes before the filter (``exact_match_stderr,strict``)."""
    base, comma, filt = metric.partition(",")
    return f"{base}_stderr{comma}{filt}"


def task_stderr(results: Mapping[str, Any], task: str, metric: str) -> float | None:
    """A task score's standard error: lm-eval's, else binomial from ``n_samples`` for an accuracy."""
    se = (results.get("tasks", {}).get(task) or {}).get(stderr_key(metric))
    if se is None and metric.startswith("acc"):
        n = results.get("n_samples", {}).get(task)
        se = binomial_se(task_value(results, task, metric), n if isinstance(n, int) else None)
    return se


def _task_lower_is_better(results: Mapping[str, Any], task: str, metric: str) -> bool:
    declared = (results.get("higher_is_better", {}).get(task) or {}).get(metric)
    if declared is not None:
        return not declared
    return metric.split(",", 1)[0] in LOWER_IS_BETTER


def check_references(model: Mapping[str, Any], ref: Mapping[str, Any], role: str, source: str = "") -> None:
    """A reference must hold every task/metric and corpus of the model's results."""
    missing = []
    for task, metric in (model.get("primary_metric") or {}).items():
        if metric is None:
            continue
        if task not in ref.get("tasks", {}):
            missing.append(task)
        elif task_value(ref, task, metric) is None:
            missing.append(f"{task}:{metric}")
    missing += [f"perplexity:{c}" for c in model.get("nll", {}) if c not in ref.get("nll", {})]
    if missing:
        where = f" ({source})" if source else ""
        raise SpearError(
            f"references.{role}{where} lacks {', '.join(missing)}: it comes from another task set; "
            f"evaluate the {role} model with the same eval suite, or point references.{role} to a model ref "
            "so that it is evaluated now"
        )
    model_limits = (model.get("settings") or {}).get("limits")
    ref_limits = (ref.get("settings") or {}).get("limits")
    if model_limits is not None and ref_limits is not None and model_limits != ref_limits:
        log.warning("references.%s was evaluated with other limits (%s vs %s): numbers may not be comparable",
                    role, ref_limits, model_limits)


def compute_retention(
    model: Mapping[str, Any],
    base: Mapping[str, Any],
    adapted: Mapping[str, Any] | None = None,
    *,
    general_tasks: Iterable[str] = (),
    domain_tasks: Iterable[str] = (),
    general_corpora: Iterable[str] = (),
    domain_corpora: Iterable[str] = (),
    min_domain_gain: float = 0.0,
    max_relative_stderr: float | None = None,
) -> dict[str, Any]:
    """The content of ``retention.json`` for ``model`` against ``base`` (and ``adapted``).

    Entries: every task of ``model`` (with its ``primary_metric``) and every perplexity corpus
    (mean NLL). ``kind`` is ``general``/``domain``/``other`` from the given lists; ``other``
    entries get a retention but enter no aggregate, and neither do tasks noisier than
    ``max_relative_stderr`` (None: every task enters).
    """
    general_tasks, domain_tasks = set(general_tasks), set(domain_tasks)
    general_corpora, domain_corpora = set(general_corpora), set(domain_corpora)
    check_references(model, base, "base")
    if adapted is not None:
        check_references(model, adapted, "adapted")

    def _kind(name: str, general: set[str], domain: set[str]) -> str:
        return "general" if name in general else "domain" if name in domain else "other"

    entries: dict[str, dict[str, Any]] = {}
    for task, metric in (model.get("primary_metric") or {}).items():
        if metric is None:
            continue
        lower = _task_lower_is_better(model, task, metric)
        base_value = task_value(base, task, metric)
        errors = [se for se in (task_stderr(model, task, metric), task_stderr(base, task, metric)) if se is not None]
        entries[task] = {
            "relative_stderr": max(errors) / abs(base_value) if errors and _finite(base_value) and base_value else None,
            "type": "task",
            "kind": _kind(task, general_tasks, domain_tasks),
            "metric": metric,
            "lower_is_better": lower,
            "base": base_value,
            "adapted": task_value(adapted, task, metric) if adapted is not None else None,
            "model": task_value(model, task, metric),
        }
    for corpus, nll in (model.get("nll") or {}).items():
        entries[f"ppl:{corpus}"] = {
            "type": "perplexity",
            "corpus": corpus,
            "kind": _kind(corpus, general_corpora, domain_corpora),
            "metric": "nll",
            "lower_is_better": True,
            "base": base["nll"].get(corpus),
            "adapted": adapted["nll"].get(corpus) if adapted is not None else None,
            "model": nll,
        }
    for name, e in entries.items():
        e["retention"] = retention(e["model"], e["base"], lower_is_better=e["lower_is_better"], label=name)
        e["gain_preservation"] = (
            gain_preservation(e["model"], e["base"], e["adapted"], lower_is_better=e["lower_is_better"],
                              min_gain=min_domain_gain, label=name)
            if adapted is not None and e["kind"] == "domain"
            else None
        )

    def noisy(e: dict[str, Any]) -> bool:
        rel = e.get("relative_stderr")
        return max_relative_stderr is not None and rel is not None and rel > max_relative_stderr

    def aggregated(kind: str) -> list[dict[str, Any]]:
        """The entries of ``kind`` that decide its aggregate: the low-noise ones, or all when none is."""
        of_kind = [e for e in entries.values() if e["kind"] == kind]
        quiet = [e for e in of_kind if not noisy(e)]
        if quiet or not of_kind:
            return quiet
        log.warning("every %s measure is noisier than eval.max_relative_stderr=%s: %s_retention averages them all",
                    kind, max_relative_stderr, kind)
        return of_kind

    general, domain = aggregated("general"), aggregated("domain")
    left_out = sorted(name for name, e in entries.items() if e["kind"] != "other"
                      and not any(e is kept for kept in (*general, *domain)))
    dgp = _mean(e["gain_preservation"] for e in domain)
    if adapted is not None and domain and dgp is None:
        log.warning("domain_gain_preservation is undefined: no domain metric has a non-zero gain")

    def _raw(res: Mapping[str, Any] | None) -> dict[str, Any] | None:
        if res is None:
            return None
        return {k: res.get(k) for k in ("model", "suite", "tasks", "perplexity", "nll", "tokens")}

    return {
        "models": {"model": model.get("model"), "base": base.get("model"), "adapted": adapted.get("model") if adapted else None},
        "entries": entries,
        "retention": {name: e["retention"] for name, e in entries.items()},
        "general_retention": _mean(e["retention"] for e in general),
        "domain_retention": _mean(e["retention"] for e in domain),
        "domain_gain_preservation": dgp,
        "left_out": {name: entries[name]["relative_stderr"] for name in left_out},
        "general": sorted(e_name for e_name, e in entries.items() if e["kind"] == "general"),
        "domain": sorted(e_name for e_name, e in entries.items() if e["kind"] == "domain"),
        "raw": {"base": _raw(base), "adapted": _raw(adapted), "model": _raw(model)},
    }


def retention_from_suite(model: Mapping[str, Any], base: Mapping[str, Any], adapted: Mapping[str, Any] | None,
                         eval_cfg, proxy) -> dict[str, Any]:
    """:func:`compute_retention` as a suite defines it: its general/domain tasks, the proxy's
    general/domain corpora, its own benchmarks (``eval.custom``, by ``role``) and its ``min_domain_gain``."""

    from spear.evaluation.custom import NLL_KINDS, kind_of

    def custom(role: str, nll: bool) -> list[str]:
        return [c.name for c in eval_cfg.own_benchmarks() if c.role == role and (kind_of(c) in NLL_KINDS) == nll]

    return compute_retention(
        model, base, adapted,
        general_tasks=[*eval_cfg.general_tasks, *custom("general", False)],
        domain_tasks=[*eval_cfg.domain_tasks, *custom("domain", False)],
        general_corpora=[proxy.general.name, *custom("general", True)],
        domain_corpora=[proxy.domain.name, *custom("domain", True)],
        min_domain_gain=eval_cfg.min_domain_gain,
        max_relative_stderr=eval_cfg.max_relative_stderr,
    )
