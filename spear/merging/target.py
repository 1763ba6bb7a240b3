"""``policy=target_retention``: search the restoration strength that reaches a general-proxy target.

The shape of the t map is the ``balanced`` policy's (``fraction``, ``t_max``, ``normalise``); a
single ``scale`` in ``[0, max_scale]`` multiplies it (t clipped to 1). Each candidate is merged
in memory (:class:`~spear.merging.inmemory.InMemoryMerger`, no disk) and scored by the mean NLL
of the loaded model on the calibration part of the general ``proxy`` corpus (``calibration_tokens``,
never evaluated text; :class:`spear.evaluation.proxy.ProxyEvaluator`).
Bisection finds the smallest scale whose proxy reaches ``target`` (restore no more than needed,
so as to keep as much of the domain gain as possible). ``metric``:

* ``retention`` (default): ``nll(base) / nll(model)`` (SPEC §1.6 retention with NLL in place of a
  score; 1.0 = as good as the base on general text);
* ``recovery``: ``(nll(adapted) - nll(model)) / (nll(adapted) - nll(base))``, the share of the
  general-NLL damage of CPT that is undone (1.0 when the adapted model is no worse than base).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from spear.merging.plan import TMap
from spear.merging.policies import search_scale

log = logging.getLogger(__name__)


def search_target(full: TMap, model, tokenizer, base_dir: Path, policy, proxy, merge) -> tuple[TMap, dict[str, Any]]:
    """(scaled TMap, search record) reaching ``policy.target`` on the general ``proxy``.

    ``model`` is the loaded adapted model (restored to adapted before returning); candidates are
    merged in memory with the ``merge`` config.
    """
    from spear.evaluation.proxy import ProxyEvaluator
    from spear.merging.inmemory import InMemoryMerger

    evaluator = ProxyEvaluator(tokenizer, proxy, roles=("general",), part="calibration",
                               calibration_tokens=policy.calibration_tokens, knob="policy.calibration_tokens")
    merger = InMemoryMerger(model, base_dir, merge)
    cache: dict[float, float] = {}

    def nll_of(tmap: TMap) -> float:
        merger.apply(tmap)
        return evaluator.nll(model, name="a target_retention candidate")["general"]

    try:
        nll_adapted = nll_of(TMap())
        nll_base = nll_of(merger.base_tmap())
        cache[0.0] = nll_adapted
        damage = nll_adapted - nll_base

        def value_of(nll: float) -> float:
            if policy.metric == "retention":
                return nll_base / nll if nll > 0 else 1.0
            return 1.0 if damage <= 0 else (nll_adapted - nll) / damage

        def measure(scale: float) -> float:
            if scale not in cache:
                cache[scale] = nll_of(full.scaled(scale))
            value = value_of(cache[scale])
            log.info("target_retention: scale %.4f -> nll %.4f, %s %.4f", scale, cache[scale], policy.metric, value)
            return value

        found = search_scale(measure, policy.target, lo=0.0, hi=policy.max_scale, tol=policy.tol, max_evals=policy.max_evals)
    finally:
        merger.release()
    if not found["reached"]:
        log.warning(
            "target_retention: %s %.4f at the largest scale %.3g is below the target %.4f; writing that model",
            policy.metric, found["value"], policy.max_scale, policy.target,
        )  # fmt: skip
    record = {
        "metric": policy.metric,
        "target": policy.target,
        "scale": found["scale"],
        "value": found["value"],
        "reached": found["reached"],
        "nll_base": nll_base,
        "nll_adapted": nll_adapted,
        "tokens": evaluator.tokens()["general"],
        "history": [{**h, "nll": cache.get(h["scale"])} for h in found["history"]],
    }
    return full.scaled(found["scale"]), record
