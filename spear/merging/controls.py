"""Which merged models a comparison evaluates: each policy and, per policy, its two controls.

* ``uniform@<label>``: every layer at the policy's mean ``t`` (does the selection beat spreading
  the same amount of restoration evenly?);
* ``<label>@random``: the same policy on a seeded permutation of the ranking (does the ranking
  beat chance?), which places the same multiset of ``t`` values without the analysis.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from spear.analysis.ranking import Ranking
from spear.config.schema import GROUP_OPTIONS, PolicyConfig, UniformPolicy
from spear.config.store import validate_node
from spear.errors import SpearError
from spear.merging.plan import TMap
from spear.merging.policies import build_tmap


@dataclass(frozen=True)
class MergedModel:
    """One model to merge and evaluate: its name, role, policy config and t map."""

    name: str
    kind: str  # "policy" or "control"
    policy: Any
    tmap: TMap
    control_of: str | None = None


def policy_from_spec(spec: str | dict[str, Any]):
    """An extra policy: a policy option name, or ``{policy: name, label: ..., <key>: value}``."""
    options = GROUP_OPTIONS["policy"]
    entry = {"policy": spec} if isinstance(spec, str) else dict(spec)
    name = entry.pop("policy", None)
    if name not in options:
        raise SpearError(f"pipeline.extra_policies entry {spec!r} needs `policy: <one of {', '.join(options)}>`")
    try:
        return validate_node(PolicyConfig, {**options[name].model_dump(), **entry}, "policy")
    except SpearError as err:
        raise SpearError(f"pipeline.extra_policies entry {spec!r}: {err}") from None


def policy_label(policy) -> str:
    """The policy's name in summaries: ``policy.label``, else its name (with ``t``/granularity when they tell)."""
    if policy.label:
        return policy.label
    label = policy.name
    if policy.name in ("uniform", "layers", "top_k"):
        label += f"_t{policy.t}"
    if policy.granularity != "layer":
        label += f"_{policy.granularity}"
    return label


def models_to_merge(ranking: Ranking, policies: list, num_layers: int, *, controls: bool, random_seed: int) -> list[MergedModel]:
    """Every policy's merged model, each followed by its two controls (when ``controls``)."""
    out: list[MergedModel] = []
    shuffled = ranking.permuted(random_seed)
    for policy in policies:
        if policy.name == "target_retention":
            raise SpearError("policy=target_retention searches with its own evaluation; run it with `python -m spear.merge`")
        label = policy_label(policy)
        tmap = build_tmap(ranking, policy, num_layers)
        out.append(MergedModel(label, "policy", policy, tmap))
        if not controls or policy.name == "uniform":
            continue
        mean_t = tmap.mean_t(num_layers)
        uniform = UniformPolicy(t=round(mean_t, 6), non_layer_t=policy.non_layer_t)
        out.append(MergedModel(f"uniform@{label}", "control", uniform,
                               TMap.of_layers(dict.fromkeys(range(num_layers), mean_t), policy.non_layer_t), label))
        out.append(MergedModel(f"{label}@random", "control", policy, build_tmap(shuffled, policy, num_layers), label))
    return out
