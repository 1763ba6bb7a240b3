"""From restoration strengths per unit to what happens to each tensor (mergekit's planning step).

Two steps, each one function:

* :class:`TMap` (what a policy returns): ``t`` per :class:`~spear.analysis.ranking.Unit` — a decoder
  layer, or one of its matrix groups (``attn``/``mlp``) — plus ``non_layer_t`` for embeddings, final
  norm and lm_head.
* :meth:`MergePlan.build`: the ``t``, kernel and kernel parameters of every tensor name, from a
  ``TMap``, the model's layer map and the ``merge`` config. The streaming writer
  (:func:`spear.merging.streaming.merge_checkpoints`) and the in-memory merger
  (:class:`spear.merging.inmemory.InMemoryMerger`) both consume a plan, so neither derives ``t``.

Which ``t`` a tensor of layer ``l`` takes: its group's unit when the map has one (matrices by the
layer map; other tensors inside a group's sub-module such as ``self_attn.*`` biases and q/k norms),
else the layer's unit (layer norms between the blocks; with module granularity a layer's unit is
the mean of its groups' ``t``), else 0 (keep the adapted tensor).
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

from spear.analysis.ranking import Unit
from spear.errors import SpearError
from spear.merging.kernels import check_kernel, check_t


@dataclass(frozen=True)
class TMap:
    """Restoration strength per unit (missing unit: ``t=0``) and for the non-layer tensors."""

    unit_t: Mapping[Unit, float] = field(default_factory=dict)
    non_layer_t: float = 0.0

    def __post_init__(self) -> None:
        units = {Unit(int(u[0]), None if u[1] is None else str(u[1])): check_t(t, f"t of unit {Unit(*u)}")
                 for u, t in dict(self.unit_t).items()}
        negative = [u.layer for u in units if u.layer < 0]
        if negative:
            raise SpearError(f"layer index {negative[0]} is negative; layers count from 0")
        object.__setattr__(self, "unit_t", units)
        object.__setattr__(self, "non_layer_t", check_t(self.non_layer_t, "policy.non_layer_t"))

    @classmethod
    def of_layers(cls, layer_t: Mapping[int, float], non_layer_t: float = 0.0) -> TMap:
        return cls({Unit(layer): t for layer, t in layer_t.items()}, non_layer_t)

    @classmethod
    def of_groups(cls, group_t: Mapping[Unit, float], num_layers: int, non_layer_t: float = 0.0) -> TMap:
        """Module granularity: each layer's own unit is the mean of its groups' ``t`` (its layer norms)."""
        units = dict(group_t)
        for layer in range(num_layers):
            ts = [t for u, t in group_t.items() if u.layer == layer]
            units[Unit(layer)] = sum(ts) / len(ts) if ts else 0.0
        return cls(units, non_layer_t)

    @classmethod
    def everywhere(cls, num_layers: int, t: float) -> TMap:
        """Every tensor at ``t`` (``t=1``: the base model)."""
        return cls.of_layers(dict.fromkeys(range(num_layers), t), t)

    @property
    def layer_t(self) -> dict[int, float]:
        return {u.layer: t for u, t in self.unit_t.items() if u.group is None}

    @property
    def group_t(self) -> dict[Unit, float] | None:
        groups = {u: t for u, t in self.unit_t.items() if u.group is not None}
        return groups or None

    def mean_t(self, num_layers: int) -> float:
        """Mean ``t`` over the decoder layers (a missing layer counts 0)."""
        layer_t = self.layer_t
        return sum(layer_t.get(i, 0.0) for i in range(num_layers)) / max(num_layers, 1)

    def max_layer(self) -> int:
        return max((u.layer for u in self.unit_t), default=-1)

    def permuted(self, seed: int, num_layers: int) -> TMap:
        """The random-placement control of a map that no ranking made: each layer's units moved to a
        seeded random layer (the permutation :meth:`Ranking.permuted` draws), the same multiset of ``t``."""
        import random

        target = list(range(num_layers))
        random.Random(seed).shuffle(target)
        return TMap({Unit(target[u.layer], u.group): t for u, t in self.unit_t.items()}, self.non_layer_t)

    def scaled(self, scale: float) -> TMap:
        """Every unit's ``t`` times ``scale`` (clipped to 1); ``non_layer_t`` unchanged."""
        return TMap({u: min(1.0, t * scale) for u, t in self.unit_t.items()}, self.non_layer_t)

    def to_json(self) -> dict[str, Any]:
        """``{"layer_t": {"3": t}, "group_t": {"3.attn": t} | null, "non_layer_t": t}`` (merge_report.json)."""
        groups = self.group_t
        return {
            "layer_t": {str(k): v for k, v in sorted(self.layer_t.items())},
            "group_t": None if groups is None else {str(u): t for u, t in sorted(groups.items())},
            "non_layer_t": self.non_layer_t,
        }

    @classmethod
    def from_json(cls, obj: Mapping[str, Any] | str) -> TMap:
        if isinstance(obj, str):
            obj = json.loads(obj)
        units = {Unit(int(k)): v for k, v in (obj.get("layer_t") or {}).items()}
        for key, value in (obj.get("group_t") or {}).items():
            layer, _, group = str(key).partition(".")
            units[Unit(int(layer), group)] = value
        return cls(units, obj.get("non_layer_t", 0.0))


@dataclass(frozen=True)
class TensorStep:
    """How one tensor is merged: strength, kernel and the kernel's own parameters."""

    t: float
    kernel: str
    params: Mapping[str, Any]


def _group_prefixes(layer_map) -> dict[str, str]:
    """Sub-module prefix -> group, e.g. ``self_attn.`` -> attn, ``mlp.`` -> mlp (unambiguous only)."""
    seen: dict[str, set[str]] = {}
    for module, group in layer_map.modules.items():
        parent = module.rsplit(".", 1)[0] if "." in module else module
        seen.setdefault(parent + ".", set()).add(group)
        seen.setdefault(module + ".", set()).add(group)
    return {prefix: next(iter(groups)) for prefix, groups in seen.items() if len(groups) == 1}


class GroupOf:
    """The matrix group (attn/mlp) a layer tensor belongs to, or ``None`` (layer norms)."""

    def __init__(self, layer_map) -> None:
        self.layer_map = layer_map
        self.layer_re = re.compile(rf"^{layer_map.layers_prefix}\d+\.")
        # longest prefix first, so that `self_attn.q_norm.` wins over `self_attn.`
        self.prefixes = sorted(_group_prefixes(layer_map).items(), key=lambda kv: -len(kv[0]))

    def __call__(self, name: str) -> str | None:
        ref = self.layer_map.matrix_of(name)
        if ref is not None:
            return ref.group
        m = self.layer_re.match(name)
        rest = name[m.end():] if m else None
        return next((group for prefix, group in self.prefixes if rest is not None and rest.startswith(prefix)), None)


@dataclass(frozen=True)
class MergePlan:
    """The merge of every tensor name: ``plan[name]`` is its :class:`TensorStep`."""

    steps: Mapping[str, TensorStep]
    tmap: TMap
    num_layers: int

    @classmethod
    def build(cls, tmap: TMap, layer_map, names: Iterable[str], merge) -> MergePlan:
        """The plan of ``names`` for ``tmap`` with the ``merge`` config (kernel and its parameters)."""
        check_kernel(merge.name)
        if tmap.max_layer() >= layer_map.num_layers:
            raise SpearError(f"the t map names layer {tmap.max_layer()} but the model has layers 0..{layer_map.num_layers - 1}")
        params = merge.kernel_params()
        group_of = GroupOf(layer_map)
        steps = {}
        for name in names:
            layer = layer_map.layer_of(name)
            if layer is None:
                t = tmap.non_layer_t
            else:
                layer_t = tmap.unit_t.get(Unit(layer), 0.0)
                group = group_of(name)
                t = tmap.unit_t.get(Unit(layer, group), layer_t) if group else layer_t
            steps[name] = TensorStep(t, merge.name, params)
        return cls(steps, tmap, layer_map.num_layers)

    def __getitem__(self, name: str) -> TensorStep:
        return self.steps[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self.steps)

    def layer_t(self) -> dict[str, float]:
        """``{"0": t, ...}`` for every decoder layer (merge_report.json's ``layer_t``)."""
        layer_t = self.tmap.layer_t
        return {str(layer): layer_t.get(layer, 0.0) for layer in range(self.num_layers)}
