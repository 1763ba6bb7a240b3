"""Restoration policies: a layer ranking -> a map of restoration strengths (``TMap``).

Pure functions of the ranking and the ``policy.*`` config; no model, no IO (apart from
:func:`load_ranking` reading ``ranking.json``).

Granularity (``policy.granularity``):

* ``layer`` (default): the units are decoder layers, ranked by ``ranking.json``'s ``order``
  and scored by ``layers[i].score``. Every tensor of layer ``l`` (matrices, norms, biases) takes
  ``layer_t[l]``.
* ``module``: the units are ``(layer, group)`` pairs, group = ``attn`` or ``mlp`` (the layer
  map's matrix groups), scored by the per-group scores of the ranking (``layers[i].groups``)
  and ranked by score (ties: the layer's rank, then the group name). A policy's fractions and
  ``k`` count units (a 30-layer model has 60), not layers. A matrix takes its group's ``t``;
  the other tensors of a layer take their group's ``t`` when they sit inside the group's
  sub-module (``self_attn.*``: attention biases, q/k norms; ``mlp.*``), and otherwise (the
  layer norms between the blocks) ``layer_t[l]``, which is then the mean of the layer's group
  ``t`` values.

Tensors outside decoder layers (embeddings, final norm, lm_head) take ``policy.non_layer_t``.

Policies (the fraction ``f`` of the units selected is ``k = ceil(f * n)``, top of the ranking
first; unselected units get ``t = 0``, i.e. keep the adapted weights):

* ``conservative``: top ``fraction=0.25``, ``t=0.5``.
* ``balanced``: top ``fraction=0.5``, ``t = t_max * norm(score)`` with ``t_max=1.0`` and
  ``normalise``: ``max`` (default) ``norm(s) = max(s, 0) / s_max``, ``s_max`` the highest score
  of all units (scores of ``ranking.json`` are percentile means in [0, 1]); ``minmax``
  ``norm(s) = (s - s_min) / (s_max - s_min)`` over all units. The top unit always gets
  ``t_max``. When the scores carry no spread (``s_max <= 0`` for ``max``, ``s_max == s_min``
  for ``minmax``) every selected unit gets ``t_max``.
* ``aggressive``: top ``fraction=0.75``, ``t=1.0`` (full restore = post-hoc freeze).
* ``top_k``: the ``k`` top units, ``t``.
* ``threshold``: the units whose score is strictly above ``threshold``, ``t``.
* ``uniform``: every unit ``t`` (the LM-Cocktail-style global baseline; no ranking needed).
* ``layers``: the explicit ``layers`` list (ints = whole layers, ``"3.attn"`` = one group with
  ``granularity=module``), ``t`` (no ranking needed).
* ``target_retention``: the ``balanced`` map scaled by the smallest ``scale`` in [0, 1] whose
  general proxy reaches ``target`` (:func:`search_scale`; the proxy runs in
  :mod:`spear.merging.target`).
"""

from __future__ import annotations

import json
import logging
import math
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from spear.errors import SpearError
from spear.merging.kernels import check_t

log = logging.getLogger(__name__)

GRANULARITIES = ("layer", "module")
GROUPS = ("attn", "mlp")


# ------------------------------------------------------------------------------------ TMap


def _group_prefixes(layer_map) -> dict[str, str]:
    """Sub-module prefix -> group, e.g. ``self_attn.`` -> attn, ``mlp.`` -> mlp (unambiguous only)."""
    seen: dict[str, set[str]] = {}
    for module, group in layer_map.modules.items():
        parent = module.rsplit(".", 1)[0] if "." in module else module
        seen.setdefault(parent + ".", set()).add(group)
        seen.setdefault(module + ".", set()).add(group)
    return {prefix: next(iter(groups)) for prefix, groups in seen.items() if len(groups) == 1}


_PREFIX_CACHE: dict[int, tuple[Any, re.Pattern, dict[str, str]]] = {}


def group_of_tensor(name: str, layer_map) -> str | None:
    """The matrix group (attn/mlp) a layer tensor belongs to, or ``None`` (layer norms)."""
    ref = layer_map.matrix_of(name)
    if ref is not None:
        return ref.group
    cached = _PREFIX_CACHE.get(id(layer_map))
    if cached is None or cached[0] is not layer_map:
        cached = (layer_map, re.compile(rf"^{layer_map.layers_prefix}\d+\."), _group_prefixes(layer_map))
        _PREFIX_CACHE[id(layer_map)] = cached
    _, layer_re, prefixes = cached
    m = layer_re.match(name)
    if not m:
        return None
    rest = name[m.end() :]
    best = None
    for prefix, group in prefixes.items():
        if rest.startswith(prefix) and (best is None or len(prefix) > len(best[0])):
            best = (prefix, group)
    return best[1] if best else None


@dataclass
class TMap:
    """Restoration strength per decoder layer (and optionally per (layer, group)).

    ``layer_t`` missing a layer means ``t=0`` for it. With ``group_t`` (module granularity) a
    tensor of layer ``l`` in group ``g`` takes ``group_t[(l, g)]`` when present; see the module
    docstring for the tensors outside the groups.
    """

    layer_t: dict[int, float] = field(default_factory=dict)
    group_t: dict[tuple[int, str], float] | None = None
    non_layer_t: float = 0.0

    def __post_init__(self) -> None:
        self.layer_t = {int(k): check_t(v, f"t of layer {k}") for k, v in dict(self.layer_t).items()}
        if self.group_t is not None:
            self.group_t = {
                (int(k[0]), str(k[1])): check_t(v, f"t of layer {k[0]} group {k[1]}") for k, v in dict(self.group_t).items()
            }
        self.non_layer_t = check_t(self.non_layer_t, "policy.non_layer_t")
        negative = [k for k in self.layer_t if k < 0] + [k[0] for k in self.group_t or {} if k[0] < 0]
        if negative:
            raise SpearError(f"layer index {negative[0]} is negative; layers count from 0")

    def t_for(self, name: str, layer_map) -> float:
        """The ``t`` of tensor ``name`` (a checkpoint/parameter name)."""
        layer = layer_map.layer_of(name)
        if layer is None:
            return self.non_layer_t
        if self.group_t:
            group = group_of_tensor(name, layer_map)
            if group is not None and (layer, group) in self.group_t:
                return self.group_t[(layer, group)]
        return self.layer_t.get(layer, 0.0)

    def mean_t(self, num_layers: int | None = None) -> float:
        """Mean ``t`` over decoder layers: those in ``layer_t``, or all ``num_layers`` (missing = 0)."""
        if num_layers is not None:
            return sum(self.layer_t.get(i, 0.0) for i in range(num_layers)) / max(num_layers, 1)
        return sum(self.layer_t.values()) / len(self.layer_t) if self.layer_t else 0.0

    def max_layer(self) -> int:
        layers = list(self.layer_t) + [k[0] for k in self.group_t or {}]
        return max(layers) if layers else -1

    def scaled(self, scale: float) -> TMap:
        """Every layer/group ``t`` times ``scale`` (clipped to 1); ``non_layer_t`` unchanged."""
        return TMap(
            {k: min(1.0, v * scale) for k, v in self.layer_t.items()},
            None if self.group_t is None else {k: min(1.0, v * scale) for k, v in self.group_t.items()},
            self.non_layer_t,
        )

    def to_json(self) -> dict[str, Any]:
        return {
            "layer_t": {str(k): v for k, v in sorted(self.layer_t.items())},
            "group_t": None
            if self.group_t is None
            else {f"{k[0]}.{k[1]}": v for k, v in sorted(self.group_t.items())},
            "non_layer_t": self.non_layer_t,
        }

    @classmethod
    def from_json(cls, obj: Mapping[str, Any] | str) -> TMap:
        if isinstance(obj, str):
            obj = json.loads(obj)
        group_t = obj.get("group_t")
        if group_t is not None:
            parsed = {}
            for key, value in group_t.items():
                layer, _, group = str(key).partition(".")
                parsed[(int(layer), group)] = value
            group_t = parsed
        return cls({int(k): v for k, v in (obj.get("layer_t") or {}).items()}, group_t, obj.get("non_layer_t", 0.0))


# --------------------------------------------------------------------------------- Ranking


@dataclass
class Ranking:
    """What the policies need of ``ranking.json`` (SPEC §2.4)."""

    num_layers: int
    order: list[int]  # highest score first
    scores: dict[int, float]
    group_scores: dict[tuple[int, str], float] | None = None
    meta: dict[str, Any] = field(default_factory=dict)


def _score(value: Any, where: str) -> float | None:
    """A finite float, or ``None`` for a missing score (analysis stores NaN as null)."""
    if value is None:
        return None
    if isinstance(value, bool):
        raise SpearError(f"ranking {where} has a non-numeric score; re-run `python -m spear.analyze`")
    try:
        value = float(value)
    except (TypeError, ValueError):
        raise SpearError(f"ranking {where} has a non-numeric score; re-run `python -m spear.analyze`") from None
    return value if math.isfinite(value) else None


def _fill_missing(scores: dict[Any, float | None], what: str) -> dict[Any, float]:
    """Missing scores rank last: they get the lowest present score (0.0 if none is present)."""
    present = [s for s in scores.values() if s is not None]
    if len(present) < len(scores):
        missing = sorted(str(k) for k, s in scores.items() if s is None)
        log.warning("ranking: no %s score for %s; treated as the lowest score", what, ", ".join(missing[:8]))
    low = min(present) if present else 0.0
    return {k: (low if s is None else s) for k, s in scores.items()}


def _groups_of_entry(entry: Mapping[str, Any]) -> dict[str, float | None] | None:
    """Per-group scores of one ``layers[i]`` entry (``groups: {"attn": s, "mlp": s}``)."""
    for key in ("groups", "group_scores", "module_scores"):
        value = entry.get(key)
        if isinstance(value, Mapping) and value:
            out = {}
            for group, score in value.items():
                if isinstance(score, Mapping):  # {"attn": {"score": s, ...}}
                    score = score.get("score")
                out[str(group)] = _score(score, f"layer {entry.get('layer')} group {group}")
            return out
    return None


def parse_ranking(obj: Mapping[str, Any], where: str = "ranking") -> Ranking:
    """Validate a ranking dict (``ranking.json``'s content, SPEC §2.4).

    Needs ``layers[{layer, score}]``; ``order`` (highest first) defaults to the scores sorted,
    ``num_layers`` to the number of entries. Per-group scores are read from
    ``layers[i].groups`` (``{"attn": s, "mlp": s}``), when present for every layer.
    Missing (null) scores rank last.
    """
    layers = obj.get("layers")
    if not isinstance(layers, list) or not layers:
        raise SpearError(f"{where} has no `layers` list; pass the ranking.json written by `python -m spear.analyze`")
    raw: dict[int, float | None] = {}
    raw_groups: dict[tuple[int, str], float | None] = {}
    for entry in layers:
        if not isinstance(entry, Mapping) or "layer" not in entry:
            raise SpearError(f"{where}: every `layers` entry needs a `layer` index")
        layer = int(entry["layer"])
        if layer in raw:
            raise SpearError(f"{where}: layer {layer} appears twice")
        raw[layer] = _score(entry.get("score"), f"layer {layer} in {where}")
        groups = _groups_of_entry(entry)
        if groups:
            raw_groups.update({(layer, g): s for g, s in groups.items()})
    num_layers = int(obj.get("num_layers") or len(raw))
    if sorted(raw) != list(range(num_layers)):
        raise SpearError(f"{where} scores layers {sorted(raw)} but the model has layers 0..{num_layers - 1}")
    scores = _fill_missing(raw, "layer")
    order = obj.get("order")
    if order is None:
        order = sorted(scores, key=lambda layer: (raw[layer] is None, -scores[layer], layer))
    order = [int(x) for x in order]
    if sorted(order) != list(range(num_layers)):
        raise SpearError(f"{where}: `order` must list every layer 0..{num_layers - 1} exactly once")
    group_scores: dict[tuple[int, str], float] | None = None
    if raw_groups and {layer for layer, _ in raw_groups} == set(raw):
        group_scores = _fill_missing(raw_groups, "group")
    meta = {k: obj[k] for k in ("spear_version", "impact", "base", "adapted") if k in obj}
    return Ranking(num_layers, order, scores, group_scores, meta)


def load_ranking(source: str | Path | Mapping[str, Any]) -> Ranking:
    """A :class:`Ranking` from a ``ranking.json`` path (or a run dir holding one), or a dict."""
    if isinstance(source, Mapping):
        return parse_ranking(source)
    path = Path(source).expanduser()
    if path.is_dir():
        path = path / "ranking.json"
    if not path.is_file():
        raise SpearError(f"ranking {path} does not exist; set ranking= to the ranking.json of `python -m spear.analyze`")
    try:
        obj = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise SpearError(f"ranking {path} is not valid JSON ({err}); re-run `python -m spear.analyze`") from None
    return parse_ranking(obj, where=str(path))


# -------------------------------------------------------------------------------- policies

Unit = Any  # int (layer) or (layer, group)


def _param(p: Mapping[str, Any], key: str, default: Any = None) -> Any:
    value = p.get(key, default)
    if value is None and default is None:
        raise SpearError(f"policy {p.get('name')!r} needs policy.{key}; set it on the command line (policy.{key}=...)")
    return value


def _fraction(p: Mapping[str, Any], default: float) -> float:
    f = float(_param(p, "fraction", default))
    if not 0.0 <= f <= 1.0:
        raise SpearError(f"policy.fraction={f} must be in [0, 1] (the share of layers restored)")
    return f


def _t(p: Mapping[str, Any], key: str = "t", default: float | None = None) -> float:
    return check_t(_param(p, key, default), f"policy.{key}")


def top_count(fraction: float, n: int) -> int:
    """``ceil(fraction * n)`` (with a tolerance for float noise), the size of a top fraction."""
    return min(n, math.ceil(fraction * n - 1e-9))


def _top(order: list[Unit], k: int, t: float) -> dict[Unit, float]:
    return {u: (t if i < k else 0.0) for i, u in enumerate(order)}


def normalised_scores(scores: Mapping[Unit, float], how: str = "max") -> dict[Unit, float]:
    """Scores mapped to [0, 1] as the ``balanced`` policy does (see the module docstring)."""
    values = list(scores.values())
    hi, lo = max(values), min(values)
    if how == "max":
        if hi <= 0:
            return {u: 1.0 for u in scores}
        return {u: max(s, 0.0) / hi for u, s in scores.items()}
    if how == "minmax":
        if hi == lo:
            return {u: 1.0 for u in scores}
        return {u: (s - lo) / (hi - lo) for u, s in scores.items()}
    raise SpearError(f"policy.normalise={how!r} is not one of max, minmax")


def _conservative(order, scores, p):
    return _top(order, top_count(_fraction(p, 0.25), len(order)), _t(p, "t", 0.5))


def _aggressive(order, scores, p):
    return _top(order, top_count(_fraction(p, 0.75), len(order)), _t(p, "t", 1.0))


def _balanced(order, scores, p):
    k = top_count(_fraction(p, 0.5), len(order))
    t_max = _t(p, "t_max", 1.0)
    norm = normalised_scores(scores, str(p.get("normalise", "max")))
    return {u: (min(1.0, t_max * norm[u]) if i < k else 0.0) for i, u in enumerate(order)}


def _top_k(order, scores, p):
    k = int(_param(p, "k"))
    if not 0 <= k <= len(order):
        raise SpearError(f"policy.k={k} must be between 0 and the number of units ({len(order)})")
    return _top(order, k, _t(p, "t", 1.0))


def _threshold(order, scores, p):
    threshold = float(_param(p, "threshold"))
    t = _t(p, "t", 1.0)
    return {u: (t if scores[u] > threshold else 0.0) for u in order}


def _uniform(order, scores, p):
    t = _t(p, "t")
    return {u: t for u in order}


def _layers(order, scores, p):
    wanted = _param(p, "layers", [])
    t = _t(p, "t", 1.0)
    units = set(order)
    chosen: set[Unit] = set()
    for entry in list(wanted or []):
        text = str(entry)
        if "." in text:
            layer_s, _, group = text.partition(".")
            if not units or not isinstance(next(iter(units)), tuple):
                raise SpearError(f"policy.layers entry {text!r} names a group; set policy.granularity=module for that")
            unit = (int(layer_s), group)
            if unit not in units:
                raise SpearError(f"policy.layers entry {text!r} is not a (layer, group) of this model")
            chosen.add(unit)
            continue
        try:
            layer = int(text)
        except ValueError:
            raise SpearError(f"policy.layers entry {text!r} is not a layer index (or 'layer.group')") from None
        matched = {u for u in units if (u[0] if isinstance(u, tuple) else u) == layer}
        if not matched:
            raise SpearError(f"policy.layers entry {layer} is not a layer of this model (0..{_num_layers(order) - 1})")
        chosen |= matched
    return {u: (t if u in chosen else 0.0) for u in order}


def _num_layers(order) -> int:
    return len({u[0] if isinstance(u, tuple) else u for u in order})


PolicyFn = Callable[[list, dict, Mapping[str, Any]], dict]
POLICIES: dict[str, PolicyFn] = {
    "conservative": _conservative,
    "balanced": _balanced,
    "aggressive": _aggressive,
    "top_k": _top_k,
    "threshold": _threshold,
    "uniform": _uniform,
    "layers": _layers,
    "target_retention": _balanced,  # the full-scale map; merge scales it (spear.merging.target)
}
NEEDS_RANKING = {"conservative", "balanced", "aggressive", "top_k", "threshold", "target_retention"}


def needs_ranking(policy: Mapping[str, Any]) -> bool:
    return _policy_name(policy) in NEEDS_RANKING


def _policy_name(policy: Mapping[str, Any]) -> str:
    name = policy.get("name")
    if name not in POLICIES:
        raise SpearError(f"policy={name!r} is unknown; use one of {', '.join(POLICIES)}")
    return str(name)


def _units(ranking: Ranking | None, num_layers: int, granularity: str, groups: tuple[str, ...]):
    """(order, scores) of the units for a granularity; scores are zeros without a ranking."""
    if ranking is None:
        layers = list(range(num_layers))
        if granularity == "layer":
            return layers, dict.fromkeys(layers, 0.0)
        units = [(layer, g) for layer in layers for g in groups]
        return units, dict.fromkeys(units, 0.0)
    if granularity == "layer":
        return list(ranking.order), dict(ranking.scores)
    if ranking.group_scores is None:
        raise SpearError(
            "policy.granularity=module needs per-group (attn/mlp) scores, which this ranking lacks; "
            "re-run `python -m spear.analyze` or use policy.granularity=layer"
        )
    rank_of = {layer: i for i, layer in enumerate(ranking.order)}
    scores = dict(ranking.group_scores)
    order = sorted(scores, key=lambda u: (-scores[u], rank_of[u[0]], u[1]))
    return order, scores


def build_tmap(
    ranking: Ranking | None,
    policy: Mapping[str, Any],
    num_layers: int | None = None,
    groups: tuple[str, ...] = GROUPS,
) -> TMap:
    """The :class:`TMap` of ``policy`` (the ``policy.*`` config as a mapping) for a ranking.

    ``num_layers`` is required when ``ranking`` is ``None`` (``uniform``, ``layers``) and must
    match the ranking otherwise.
    """
    name = _policy_name(policy)
    granularity = str(policy.get("granularity", "layer"))
    if granularity not in GRANULARITIES:
        raise SpearError(f"policy.granularity={granularity!r} is not one of {', '.join(GRANULARITIES)}")
    if ranking is None:
        if name in NEEDS_RANKING:
            raise SpearError(f"policy={name} needs a layer ranking; set ranking=<path to ranking.json>")
        if num_layers is None:
            raise SpearError("build_tmap needs num_layers when no ranking is given")
    elif num_layers is not None and ranking.num_layers != num_layers:
        raise SpearError(
            f"the ranking has {ranking.num_layers} layers but the model has {num_layers}; "
            "use the ranking.json of this base/adapted pair"
        )
    n = ranking.num_layers if ranking is not None else int(num_layers)
    order, scores = _units(ranking, n, granularity, groups)
    unit_t = POLICIES[name](order, scores, policy)
    non_layer_t = check_t(policy.get("non_layer_t", 0.0) or 0.0, "policy.non_layer_t")
    if granularity == "layer":
        return TMap({layer: unit_t.get(layer, 0.0) for layer in range(n)}, None, non_layer_t)
    group_t = {u: unit_t.get(u, 0.0) for u in order}
    layer_t = {}
    for layer in range(n):
        ts = [t for (lyr, _), t in group_t.items() if lyr == layer]
        layer_t[layer] = sum(ts) / len(ts) if ts else 0.0
    return TMap(layer_t, group_t, non_layer_t)


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
