"""Restoration policies: a ranking -> restoration strength ``t`` per unit (a :class:`TMap`).

Pure functions of the ranking and the validated ``policy`` config (its keys, defaults and ranges
live in :mod:`spear.config.schema`); no model, no IO.

Units (``policy.granularity``): ``layer`` ranks decoder layers by ranking.json's ``order``;
``module`` ranks each layer's matrix groups (``attn``/``mlp``) by their own scores (ties: the
layer's rank, then the group), so a fraction or ``k`` counts groups (a 30-layer model has 60).
Which tensors take a unit's ``t`` is :mod:`spear.merging.plan`'s job. Tensors outside decoder
layers take ``policy.non_layer_t``.

Policies (a top ``fraction`` of ``n`` units is ``ceil(fraction * n)``, top of the ranking first;
unselected units get ``t = 0``, i.e. keep the adapted weights):

* ``conservative``, ``aggressive``: the top ``fraction`` at ``t``.
* ``balanced``: the top ``fraction`` at ``t = t_max * norm(score)``; ``normalise=max``:
  ``norm(s) = max(s, 0) / s_max`` over all units, ``minmax``: ``(s - s_min) / (s_max - s_min)``.
  The top unit always gets ``t_max``; scores without spread give every selected unit ``t_max``.
* ``top_k``: the ``k`` top units at ``t``; ``threshold``: the units scored strictly above
  ``threshold`` at ``t``.
* ``uniform``: every unit at ``t`` (the LM-Cocktail-style global baseline; no ranking needed).
* ``layers``: the explicit ``layers`` list (ints = whole layers, ``"3.attn"`` = one group with
  ``granularity=module``) at ``t`` (no ranking needed).
* ``lines`` (LiNeS, ICLR 2025): ``t`` linear in depth, ``t_first + (t_last - t_first) * l/(L-1)``, so
  shallow layers stay closest to the base (no ranking needed).
* ``target_retention``: the ``balanced`` map scaled by the smallest factor whose general proxy
  reaches ``target`` (:func:`search_scale`; the search runs in :mod:`spear.merging.target`).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

from spear.analysis.ranking import Ranking, Unit
from spear.config.schema import NEEDS_RANKING
from spear.errors import SpearError
from spear.merging.plan import TMap
from spear.models.layer_map import GROUPS

Order = list[Unit]
Scores = dict[Unit, float]


def top_count(fraction: float, n: int) -> int:
    """``ceil(fraction * n)`` (with a tolerance for float noise), the size of a top fraction."""
    return min(n, math.ceil(fraction * n - 1e-9))


def _top(order: Order, k: int, t: float) -> dict[Unit, float]:
    return {u: (t if i < k else 0.0) for i, u in enumerate(order)}


def normalised_scores(scores: Scores, how: str = "max") -> Scores:
    """Scores mapped to [0, 1] as the ``balanced`` policy does (see the module docstring)."""
    values = list(scores.values())
    hi, lo = max(values), min(values)
    if how == "max":
        return {u: 1.0 for u in scores} if hi <= 0 else {u: max(s, 0.0) / hi for u, s in scores.items()}
    return {u: 1.0 for u in scores} if hi == lo else {u: (s - lo) / (hi - lo) for u, s in scores.items()}


def _top_fraction(order: Order, scores: Scores, p) -> dict[Unit, float]:
    return _top(order, top_count(p.fraction, len(order)), p.t)


def _balanced(order: Order, scores: Scores, p) -> dict[Unit, float]:
    k = top_count(p.fraction, len(order))
    norm = normalised_scores(scores, p.normalise)
    return {u: (min(1.0, p.t_max * norm[u]) if i < k else 0.0) for i, u in enumerate(order)}


def _top_k(order: Order, scores: Scores, p) -> dict[Unit, float]:
    if p.k > len(order):
        raise SpearError(f"policy.k={p.k} must be between 0 and the number of units ({len(order)})")
    return _top(order, p.k, p.t)


def _threshold(order: Order, scores: Scores, p) -> dict[Unit, float]:
    return {u: (p.t if scores[u] > p.threshold else 0.0) for u in order}


def _uniform(order: Order, scores: Scores, p) -> dict[Unit, float]:
    return dict.fromkeys(order, p.t)


def _layers(order: Order, scores: Scores, p) -> dict[Unit, float]:
    units = set(order)
    num_layers = len({u.layer for u in units})
    chosen: set[Unit] = set()
    for entry in p.layers:
        layer_s, _, group = str(entry).partition(".")
        try:
            layer = int(layer_s)
        except ValueError:
            raise SpearError(f"policy.layers entry {entry!r} is not a layer index (or 'layer.group')") from None
        if group and p.granularity != "module":
            raise SpearError(f"policy.layers entry {entry!r} names a group; set policy.granularity=module for that")
        matched = {Unit(layer, group)} & units if group else {u for u in units if u.layer == layer}
        if not matched:
            raise SpearError(f"policy.layers entry {entry!r} is not a unit of this model (layers 0..{num_layers - 1})")
        chosen |= matched
    return {u: (p.t if u in chosen else 0.0) for u in order}


def _lines(order: Order, scores: Scores, p) -> dict[Unit, float]:
    last = max(u.layer for u in order)
    return {u: p.t_first + (p.t_last - p.t_first) * (u.layer / last if last else 0.0) for u in order}


PolicyFn = Callable[[Order, Scores, Any], dict[Unit, float]]
POLICIES: dict[str, PolicyFn] = {
    "conservative": _top_fraction,
    "balanced": _balanced,
    "aggressive": _top_fraction,
    "top_k": _top_k,
    "threshold": _threshold,
    "uniform": _uniform,
    "layers": _layers,
    "lines": _lines,
    "target_retention": _balanced,  # the full-scale map; spear.merging.target scales it
}
FITTED = ("optimized",)  # policies whose t map is fitted on a loaded model (spear.merging.optimize)


def _unranked_units(num_layers: int, granularity: str, groups: tuple[str, ...]) -> tuple[Order, Scores]:
    units = [Unit(layer) for layer in range(num_layers)] if granularity == "layer" else [
        Unit(layer, g) for layer in range(num_layers) for g in groups
    ]
    return units, dict.fromkeys(units, 0.0)


def build_tmap(ranking: Ranking | None, policy, num_layers: int, groups: tuple[str, ...] = GROUPS) -> TMap:
    """The :class:`TMap` of ``policy`` (a validated ``policy`` config) for a ranking of ``num_layers`` layers."""
    if policy.name in FITTED:
        raise SpearError(f"policy={policy.name} is fitted on the loaded model (spear.merging.optimize.fit_tmap), not "
                         "derived from a ranking")
    if ranking is None:
        if policy.name in NEEDS_RANKING:
            raise SpearError(f"policy={policy.name} needs a layer ranking; set ranking=<path to ranking.json>")
        order, scores = _unranked_units(num_layers, policy.granularity, groups)
    else:
        order, scores = ranking.check_layers(num_layers).units(policy.granularity)
    unit_t = POLICIES[policy.name](order, scores, policy)
    if policy.granularity == "layer":
        return TMap(unit_t, policy.non_layer_t)
    return TMap.of_groups(unit_t, num_layers, policy.non_layer_t)


# ----------------------------------------------------------------------- target search


def search_scale(
    measure: Callable[[float], float],
    target: float,
    *,
    lo: float = 0.0,
    hi: float = 1.0,
    tol: float = 0.02,
    max_evals: int = 16,
) -> dict[str, Any]:
    """Smallest ``scale`` in ``[lo, hi]`` with ``measure(scale) >= target``, by bisection.

    ``measure`` is assumed non-decreasing in ``scale`` (restoring more recovers more). Returns
    ``{"scale", "value", "reached", "history": [{"scale", "value"}]}``: ``lo`` when it already
    meets the target (restore nothing more), ``hi`` with ``reached: false`` when even ``hi``
    misses it.
    """
    if not lo <= hi:
        raise SpearError(f"search range [{lo}, {hi}] is empty")
    history: list[dict[str, float]] = []

    def probe(scale: float) -> float:
        value = float(measure(scale))
        history.append({"scale": scale, "value": value})
        return value

    v_lo = probe(lo)
    if v_lo >= target:
        return {"scale": lo, "value": v_lo, "reached": True, "history": history}
    v_hi = probe(hi)
    if v_hi < target:
        return {"scale": hi, "value": v_hi, "reached": False, "history": history}
    a, b, v_b = lo, hi, v_hi  # invariant: measure(a) < target <= measure(b)
    while b - a > tol and len(history) < max_evals:
        mid = (a + b) / 2
        v = probe(mid)
        if v >= target:
            b, v_b = mid, v
        else:
            a = mid
    return {"scale": b, "value": v_b, "reached": True, "history": history}
