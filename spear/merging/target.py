"""``policy=target_retention``: search the restoration strength that reaches a general-proxy target.

The shape of the t map is the ``balanced`` policy's (``fraction``, ``t_max``, ``normalise``); a
single ``scale`` in ``[0, max_scale]`` multiplies it (t clipped to 1). Each candidate is merged
in memory (:class:`~spear.merging.inmemory.InMemoryMerger`, no disk) and scored by the mean NLL
of the loaded model on general text (:func:`spear.evaluation.perplexity.corpus_nll_from_ids`).
Bisection finds the smallest scale whose proxy reaches ``target`` (restore no more than needed,
so as to keep as much of the domain gain as possible). ``metric``:

* ``retention`` (default): ``nll(base) / nll(model)`` (SPEC §1.6 retention with NLL in place of a
  score; 1.0 = as good as the base on general text);
* ``recovery``: ``(nll(adapted) - nll(model)) / (nll(adapted) - nll(base))``, the share of the
  general-NLL damage of CPT that is undone (1.0 when the adapted model is no worse than base).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from spear.errors import SpearError
from spear.merging.policies import TMap, search_scale

log = logging.getLogger(__name__)
METRICS = ("retention", "recovery")


def general_token_ids(tokenizer, policy: Mapping[str, Any]):
    from spear.evaluation.perplexity import tokenize_corpus

    path = policy.get("general_text")
    if path is None:
        from spear.embedded import asset_path

        path = asset_path("general_text")
    path = Path(str(path)).expanduser()
    if not path.is_file():
        raise SpearError(f"policy.general_text={path} is not a file; point it to a text file or leave it null")
    text = path.read_text(encoding="utf-8", errors="replace")
    return tokenize_corpus(tokenizer, text, int(policy.get("max_tokens", 8192)))


def search_target(
    full: TMap,
    model,
    input_ids,
    base_dir: Path,
    policy: Mapping[str, Any],
    *,
    kernel: str = "slerp",
    kernel_params: dict[str, Any] | None = None,
) -> tuple[TMap, dict[str, Any]]:
    """(scaled TMap, search record) reaching ``policy.target`` on the general proxy.

    ``model`` is the loaded adapted model (restored to adapted before returning).
    """
    from spear.evaluation.perplexity import corpus_nll_from_ids
    from spear.merging.inmemory import InMemoryMerger

    metric = str(policy.get("metric", "retention"))
    if metric not in METRICS:
        raise SpearError(f"policy.metric={metric!r} is not one of {', '.join(METRICS)}")
    if policy.get("target") is None:
        raise SpearError("policy=target_retention needs policy.target (e.g. policy.target=0.99)")
    target = float(policy["target"])
    max_scale = float(policy.get("max_scale", 1.0))
    if max_scale <= 0:
        raise SpearError(f"policy.max_scale={max_scale} must be > 0")
    nll_kwargs = {
        "max_length": int(policy.get("max_length", 512)),
        "stride": int(policy.get("stride", 512)),
        "batch_size": int(policy.get("batch_size", 4)),
    }
    merger = InMemoryMerger(model, base_dir, kernel=kernel, kernel_params=kernel_params)
    cache: dict[float, float] = {}

    def nll_of(tmap: TMap) -> float:
        merger.apply(tmap)
        return float(corpus_nll_from_ids(model, input_ids, **nll_kwargs)["nll"])

    try:
        nll_adapted = nll_of(TMap())
        nll_base = nll_of(merger.base_tmap())
        cache[0.0] = nll_adapted
        damage = nll_adapted - nll_base

        def value_of(nll: float) -> float:
            if metric == "retention":
                return nll_base / nll if nll > 0 else 1.0
            return 1.0 if damage <= 0 else (nll_adapted - nll) / damage

        def measure(scale: float) -> float:
            if scale not in cache:
                cache[scale] = nll_of(full.scaled(scale))
            value = value_of(cache[scale])
            log.info("target_retention: scale %.4f -> nll %.4f, %s %.4f", scale, cache[scale], metric, value)
            return value

        found = search_scale(
            measure,
            target,
            lo=0.0,
            hi=max_scale,
            tol=float(policy.get("tol", 0.02)),
            max_evals=int(policy.get("max_evals", 12)),
        )
    finally:
        merger.release()
    if not found["reached"]:
        log.warning(
            "target_retention: %s %.4f at the largest scale %.3g is below the target %.4f; writing that model",
            metric, found["value"], max_scale, target,
        )  # fmt: skip
    record = {
        "metric": metric,
        "target": target,
        "scale": found["scale"],
        "value": found["value"],
        "reached": found["reached"],
        "nll_base": nll_base,
        "nll_adapted": nll_adapted,
        "tokens": int(input_ids.numel()),
        "history": [{**h, "nll": cache.get(h["scale"])} for h in found["history"]],
    }
    return full.scaled(found["scale"]), record
