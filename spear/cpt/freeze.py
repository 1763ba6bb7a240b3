"""Layer-freeze masks for CPT: config + layer map + parameter names -> :class:`FreezePlan`.

``plan_freeze`` is pure (no model, no IO): it decides which decoder layers and which
parameters are frozen. ``ranking_for`` does the IO of ``freeze=ranked`` (read a ranking.json,
or compute the Spectrum SNR ranking of the base model), ``apply_freeze`` sets
``requires_grad=False`` on a model.

Modes (``freeze.mode``):

* ``none``: every decoder layer trains (``freeze.embeddings`` still applies).
* ``ranked``: the top ``freeze.k`` layers of a ranking (``order`` of a SPEC §2.4 ranking.json at
  ``freeze.ranking``; without one, the Spectrum SNR ranking of the base model, highest mean SNR
  first, as in Spectrum).
* ``last`` / ``first``: the last / first ``freeze.k`` layers by position (the position baseline).
* ``layers``: the explicit list ``freeze.layers``.

What freezing a layer covers (``freeze.modules``):

* ``all`` (default): every parameter of the layer: its attention and MLP matrices, their biases,
  and its layer norms. This is the training-time equivalent of restoring the whole layer.
* ``attn`` / ``mlp`` / module names (``self_attn.q_proj``, or an unambiguous suffix ``q_proj``):
  only those projections (weight and bias) of the frozen layers; layer norms stay trainable.

Embeddings (``freeze.embeddings``: ``none``/``false``, ``input``, ``output``, ``both``/``true``)
are independent of layers. When input and output embeddings are tied they are one tensor, so
freezing either freezes both (the plan says so in ``notes``). The final norm always trains.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from spear.errors import SpearError
from spear.models.layer_map import GROUPS

log = logging.getLogger(__name__)

EMBEDDING_CHOICES = ("none", "input", "output", "both")


@dataclass(frozen=True)
class FreezePlan:
    """Which layers and parameters are frozen; every other parameter trains."""

    mode: str
    frozen_layers: tuple[int, ...]
    frozen_params: tuple[str, ...]
    trainable_params: tuple[str, ...]
    modules: str | tuple[str, ...]  # "all" or the module names frozen in the frozen layers
    embeddings: str
    tied_embeddings: bool
    ranking_source: str | None = None
    notes: tuple[str, ...] = field(default_factory=tuple)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["frozen_layers"] = list(self.frozen_layers)
        d["modules"] = self.modules if isinstance(self.modules, str) else list(self.modules)
        d.pop("frozen_params")
        d.pop("trainable_params")
        d["num_frozen_params"] = len(self.frozen_params)
        d["num_trainable_params"] = len(self.trainable_params)
        d["notes"] = list(self.notes)
        return d


def _as_list(value: Any) -> list:
    if value is None:
        return []
    if isinstance(value, str):
        return [v.strip() for v in value.split(",") if v.strip()]
    return list(value)


def resolve_modules(spec: Any, layer_modules: Mapping[str, str]) -> str | tuple[str, ...]:
    """``"all"`` or the sorted module names that ``freeze.modules`` denotes."""
    items = _as_list(spec if spec is not None else "all")
    if not items or items == ["all"]:
        return "all"
    chosen: set[str] = set()
    for item in items:
        item = str(item)
        if item == "all":
            raise SpearError("freeze.modules mixes 'all' with other names; use all, attn, mlp, or a list of module names")
        if item in GROUPS:
            chosen.update(m for m, g in layer_modules.items() if g == item)
            continue
        if item in layer_modules:
            chosen.add(item)
            continue
        matches = [m for m in layer_modules if m.endswith("." + item)]
        if len(matches) == 1:
            chosen.add(matches[0])
            continue
        known = ", ".join(["all", *GROUPS, *sorted(layer_modules)])
        reason = "is ambiguous" if matches else "is unknown"
        raise SpearError(f"freeze.modules: {item!r} {reason} for this model; use one of {known}")
    return tuple(sorted(chosen))


def _embeddings_choice(value: Any) -> str:
    if value is None or value is False:
        return "none"
    if value is True:
        return "both"
    value = str(value).lower()
    if value in ("false", "no", "off"):
        return "none"
    if value in ("true", "yes", "on"):
        return "both"
    if value not in EMBEDDING_CHOICES:
        raise SpearError(f"freeze.embeddings={value!r} is not one of {', '.join(EMBEDDING_CHOICES)} (or true/false)")
    return value


def _check_k(freeze_cfg: Any, num_layers: int) -> int:
    k = freeze_cfg.k
    if k > num_layers:
        raise SpearError(f"freeze.k={k} is out of range: the model has {num_layers} layers; use 0 <= freeze.k <= {num_layers}")
    return k


def check_ranking(order: Sequence[int], num_layers: int, source: str) -> list[int]:
    """Validate a ranking (``order`` of distinct layer indices, highest first) for a model."""
    try:
        order = [int(x) for x in order]
    except (TypeError, ValueError):
        raise SpearError(f"{source}: 'order' must be a list of layer indices") from None
    bad = [x for x in order if not 0 <= x < num_layers]
    if bad or len(set(order)) != len(order):
        raise SpearError(
            f"{source}: 'order' must list distinct layers in [0, {num_layers}) "
            f"(got {'out-of-range ' + str(bad[:5]) if bad else 'duplicates'}); fix freeze.ranking"
        )
    return order


def select_layers(freeze_cfg: Any, num_layers: int, ranking: Sequence[int] | None = None) -> list[int]:
    """The decoder layers ``freeze_cfg`` (a validated ``freeze`` config) freezes (sorted)."""
    mode = freeze_cfg.mode
    if mode == "none":
        return []
    if mode == "layers":
        layers = list(freeze_cfg.layers)
        bad = [x for x in layers if not 0 <= x < num_layers]
        if bad:
            raise SpearError(f"freeze.layers has {bad} outside [0, {num_layers}): the model has {num_layers} layers")
        return sorted(set(layers))
    k = _check_k(freeze_cfg, num_layers)
    if mode == "first":
        return list(range(k))
    if mode == "last":
        return list(range(num_layers - k, num_layers))
    if ranking is None:
        raise SpearError("freeze=ranked needs a ranking: set freeze.ranking to a ranking.json")
    order = check_ranking(ranking, num_layers, "the ranking")
    if k > len(order):
        raise SpearError(f"freeze.k={k} but the ranking lists only {len(order)} layers; lower freeze.k")
    return sorted(order[:k])


def plan_freeze(
    freeze_cfg: Any,
    layer_map,
    param_names: Sequence[str],
    *,
    ranking: Sequence[int] | None = None,
    ranking_source: str | None = None,
    input_embedding: str | None = None,
    output_embedding: str | None = None,
    tied: bool = False,
) -> FreezePlan:
    """Plan a freeze mask. ``param_names`` are the model's (deduplicated) parameter names;
    ``input_embedding``/``output_embedding`` name the embedding parameters (the output one is
    absent from ``param_names`` when ``tied``)."""
    mode = freeze_cfg.mode
    layers = select_layers(freeze_cfg, layer_map.num_layers, ranking)
    modules = resolve_modules(freeze_cfg.modules, layer_map.modules)
    embeddings = _embeddings_choice(freeze_cfg.embeddings)
    notes: list[str] = []

    layer_set = set(layers)
    rest_re = re.compile(rf"^{layer_map.layers_prefix}(\d+)\.(.+)$")
    frozen: set[str] = set()
    for name in param_names:
        m = rest_re.match(name)
        if not m or int(m.group(1)) not in layer_set:
            continue
        if modules == "all" or any(m.group(2).startswith(mod + ".") for mod in modules):
            frozen.add(name)

    names = set(param_names)
    if embeddings != "none":
        wanted = []
        if embeddings in ("input", "both"):
            wanted.append(("input", input_embedding))
        if embeddings in ("output", "both"):
            wanted.append(("output", output_embedding if not tied else input_embedding))
        for which, pname in wanted:
            if pname is None or pname not in names:
                raise SpearError(f"freeze.embeddings={embeddings}: this model has no separate {which} embedding parameter")
            frozen.add(pname)
        if tied:
            notes.append(
                f"input and output embeddings are tied ({input_embedding} = {output_embedding}): "
                f"freeze.embeddings={embeddings} freezes both"
            )
    if modules != "all" and layers:
        notes.append("freeze.modules limits freezing to " + ", ".join(modules) + "; layer norms of frozen layers train")
    if mode == "ranked" and ranking_source:
        notes.append(f"ranking from {ranking_source}")

    ordered = list(param_names)
    return FreezePlan(
        mode=mode,
        frozen_layers=tuple(layers),
        frozen_params=tuple(n for n in ordered if n in frozen),
        trainable_params=tuple(n for n in ordered if n not in frozen),
        modules=modules,
        embeddings=embeddings,
        tied_embeddings=bool(tied),
        ranking_source=ranking_source,
        notes=tuple(notes),
    )


# -- IO: rankings ---------------------------------------------------------------------------------
def ranking_for(freeze_cfg: Any, model_dir: str | Path, num_layers: int) -> tuple[list[int] | None, str | None]:
    """(ranking, where it came from) for ``freeze=ranked``; ``(None, None)`` for other modes."""
    from spear.analysis.ranking import Ranking
    from spear.analysis.scoring import spectrum_snr_ranking

    if freeze_cfg.mode != "ranked":
        return None, None
    if freeze_cfg.ranking:
        ranking = Ranking.load(freeze_cfg.ranking, key="freeze.ranking").check_layers(num_layers, "freeze.ranking")
        return list(ranking.order), str(freeze_cfg.ranking)
    log.info("freeze=ranked: no freeze.ranking given; computing the Spectrum SNR ranking of the base model %s", model_dir)
    order = spectrum_snr_ranking(Path(model_dir))
    return check_ranking(order, num_layers, "the Spectrum SNR ranking"), "spectrum_snr(base)"


# -- applying a plan to a model -----------------------------------------------------------------
def embedding_layout(model) -> tuple[list[str], str | None, str | None, bool]:
    """(deduplicated parameter names, input embedding name, output embedding name, tied)."""
    names = [n for n, _ in model.named_parameters()]
    module_names = {id(mod): n for n, mod in model.named_modules()}

    def weight_name(module) -> str | None:
        if module is None or getattr(module, "weight", None) is None or id(module) not in module_names:
            return None
        prefix = module_names[id(module)]
        return f"{prefix}.weight" if prefix else "weight"

    inp, out = model.get_input_embeddings(), model.get_output_embeddings()
    tied = inp is not None and out is not None and inp.weight is out.weight
    return names, weight_name(inp), weight_name(out), tied


def plan_for_model(freeze_cfg: Any, model, layer_map, ranking=None, ranking_source=None) -> FreezePlan:
    names, in_name, out_name, tied = embedding_layout(model)
    return plan_freeze(
        freeze_cfg, layer_map, names, ranking=ranking, ranking_source=ranking_source,
        input_embedding=in_name, output_embedding=out_name, tied=tied,
    )


def apply_freeze(model, plan: FreezePlan) -> dict[str, int]:
    """Set ``requires_grad`` from the plan; returns parameter counts (numel)."""
    frozen = set(plan.frozen_params)
    counts = {"trainable": 0, "frozen": 0}
    for name, param in model.named_parameters():
        is_frozen = name in frozen
        param.requires_grad_(not is_frozen)
        counts["frozen" if is_frozen else "trainable"] += param.numel()
    counts["total"] = counts["trainable"] + counts["frozen"]
    return counts
