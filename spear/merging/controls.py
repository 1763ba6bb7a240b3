"""Which merged models a comparison evaluates: each policy and, per policy, its two controls.

* ``uniform@<label>``: every layer at the policy's mean ``t`` (does the selection beat spreading
  the same amount of restoration evenly?);
* ``<label>@random``: the same policy on a seeded permutation of the ranking (does the ranking
  beat chance?), which places the same multiset of ``t`` values without the analysis; for a policy
  that no ranking drives (``lines``, ``layers``, ``optimized``), its own ``t`` map permuted over the
  layers in the same way (does the placement matter?).

A pipeline entry may name its own ``merge`` kernel (``{policy: uniform, t: 0.0, merge: {name: dg_hard,
scope: all}}``), which its controls use too, its own ranking proxy (``{policy: balanced, impact: grad_delta}``:
one more cached analysis per seed, so rankings are compared on one frontier), and may leave its controls
out (``controls: false``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from spear.analysis.ranking import Ranking
from spear.config.schema import (
    GROUP_OPTIONS,
    NEEDS_RANKING,
    ImpactConfig,
    MergeConfig,
    PolicyConfig,
    UniformPolicy,
)
from spear.config.store import validate_node
from spear.errors import SpearError
from spear.merging.plan import TMap
from spear.merging.policies import FITTED, build_tmap


@dataclass(frozen=True)
class MergedModel:
    """One model to merge and evaluate: its name, role, policy config and t map."""

    name: str
    kind: str  # "policy" or "control"
    policy: Any
    tmap: TMap
    control_of: str | None = None
    merge: Any = None  # the entry's own merge config (None: the run's)


ENTRY_KEYS = ("merge", "impact", "controls")  # an entry's keys that are not its policy's
GROUP_SCHEMAS = {"merge": MergeConfig, "impact": ImpactConfig}


@dataclass(frozen=True)
class Entry:
    """One compared policy: its config, its own kernel and ranking proxy (``None``: the run's) and whether
    it gets controls."""

    policy: Any
    merge: Any = None
    controls: bool = True
    impact: Any = None

    @property
    def label(self) -> str:
        return policy_label(self.policy, self.merge, self.impact)


def entry_from_spec(spec: str | dict[str, Any]) -> Entry:
    """A ``pipeline.extra_policies`` entry: a policy option name, or a dict of the policy's keys plus
    optional ``merge`` and ``impact`` (:func:`group_from_spec`) and ``controls``."""
    controls = True if isinstance(spec, str) else spec.get("controls", True)
    if not isinstance(controls, bool):
        raise SpearError(f"pipeline.extra_policies entry {spec!r}: controls={controls!r} must be true or false")
    policy, impact = policy_from_spec(spec), group_from_spec(spec, "impact")
    if impact is not None and policy.name not in NEEDS_RANKING:
        raise SpearError(f"pipeline.extra_policies entry {spec!r}: policy={policy.name} uses no ranking, so its "
                         f"impact has nothing to rank; drop `impact` or use one of {', '.join(NEEDS_RANKING)}")
    return Entry(policy, group_from_spec(spec, "merge"), controls, impact)


def policy_from_spec(spec: str | dict[str, Any]):
    """An extra policy: a policy option name, or ``{policy: name, label: ..., <key>: value}`` (``merge`` and
    ``controls`` keys belong to the entry: :func:`entry_from_spec`)."""
    options = GROUP_OPTIONS["policy"]
    entry = {"policy": spec} if isinstance(spec, str) else dict(spec)
    for key in ENTRY_KEYS:
        entry.pop(key, None)
    name = entry.pop("policy", None)
    if name not in options:
        raise SpearError(f"pipeline.extra_policies entry {spec!r} needs `policy: <one of {', '.join(options)}>`")
    try:
        return validate_node(PolicyConfig, {**options[name].model_dump(), **entry}, "policy")
    except SpearError as err:
        raise SpearError(f"pipeline.extra_policies entry {spec!r}: {err}") from None


def group_from_spec(spec: str | dict[str, Any], group: str):
    """An extra policy's own ``merge`` or ``impact`` node (``merge: dg_hard`` or ``merge: {name: dg_hard, ...}``;
    ``impact: grad_delta``), on its option's defaults, or ``None`` when the entry has none."""
    value = None if isinstance(spec, str) else spec.get(group)
    if value is None:
        return None
    entry = {"name": value} if isinstance(value, str) else dict(value)
    options = GROUP_OPTIONS[group]
    if entry.get("name") not in options:
        raise SpearError(f"pipeline.extra_policies entry {spec!r}: {group} needs `name: <one of {', '.join(options)}>`")
    try:
        return validate_node(GROUP_SCHEMAS[group], {**options[entry["name"]].model_dump(), **entry}, group)
    except SpearError as err:
        raise SpearError(f"pipeline.extra_policies entry {spec!r}: {err}") from None


def policy_label(policy, merge=None, impact=None) -> str:
    """The policy's name in summaries: ``policy.label``, else its name (with ``t``, granularity, the fit's
    weight, the entry's own ranking proxy and kernel when they tell)."""
    if policy.label:
        return policy.label
    label = policy.name
    if policy.name in ("uniform", "layers", "top_k"):
        label += f"_t{policy.t}"
    if policy.name == "optimized":
        label += f"_w{policy.domain_weight:g}" + ("_tied" if policy.tie_layers else "")
    if policy.granularity != "layer":
        label += f"_{policy.granularity}"
    if impact is not None:
        label += f"_{impact.name}"
    if merge is not None:
        label += f"+{merge.name}" + (f"_{merge.scope}" if merge.name == "dg_hard" else "")
    return label


def models_to_merge(ranking: Ranking, entries: list[Entry], num_layers: int, *, controls: bool,
                    random_seed: int, fitted: dict[str, TMap] | None = None,
                    rankings: dict[str, Ranking] | None = None) -> list[MergedModel]:
    """Every entry's merged model, each followed by its two controls (when ``controls`` and the entry's
    own ``controls``); ``fitted``: the t maps of fitted policies (``optimized``) by label; ``rankings``:
    the rankings of entries with their own ``impact``, by label (the others use ``ranking``)."""
    out: list[MergedModel] = []
    for entry in entries:
        policy, merge, label = entry.policy, entry.merge, entry.label
        if policy.name == "target_retention":
            raise SpearError("policy=target_retention searches with its own evaluation; run it with `python -m spear.merge`")
        own = (rankings or {}).get(label, ranking)
        tmap = (fitted or {})[label] if policy.name in FITTED else build_tmap(own, policy, num_layers)
        out.append(MergedModel(label, "policy", policy, tmap, merge=merge))
        same_t_everywhere = policy.name == "uniform" or (policy.name == "optimized" and policy.tie_layers)
        if not (controls and entry.controls) or same_t_everywhere:  # its controls would be the model itself
            continue
        mean_t = tmap.mean_t(num_layers)
        uniform = UniformPolicy(t=round(mean_t, 6), non_layer_t=policy.non_layer_t)
        out.append(MergedModel(f"uniform@{label}", "control", uniform,
                               TMap.of_layers(dict.fromkeys(range(num_layers), mean_t), tmap.non_layer_t), label, merge))
        placed = (build_tmap(own.permuted(random_seed), policy, num_layers) if policy.name in NEEDS_RANKING
                  else tmap.permuted(random_seed, num_layers))
        out.append(MergedModel(f"{label}@random", "control", policy, placed, label, merge))
    return out
