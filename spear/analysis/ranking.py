"""The one ``Ranking`` type: ``ranking.json`` (SPEC §2.4) loaded, validated, saved and permuted.

The analysis writes it, and the merge policies, the freeze masks and the pipeline's random-ranking
control read it, all through this class. A ranking orders *units*: decoder layers (``Unit(l)``)
or, for ``granularity=module``, a layer's matrix groups (``Unit(l, "attn")``, ``Unit(l, "mlp")``,
scored by ``layers[i].groups``).
"""

from __future__ import annotations

import json
import logging
import math
import random
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

from spear.errors import SpearError

log = logging.getLogger(__name__)

RANKING_FILE = "ranking.json"


class Unit(NamedTuple):
    """What a policy gives a ``t``: a decoder layer, or one matrix group of it (``attn``/``mlp``)."""

    layer: int
    group: str | None = None

    def __str__(self) -> str:
        return str(self.layer) if self.group is None else f"{self.layer}.{self.group}"


def _score(value: Any, where: str) -> float | None:
    """A finite float, or ``None`` for a missing score (the analysis stores NaN as null)."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise SpearError(f"{where} has a non-numeric score {value!r}; re-run `python -m spear.analyze`")
    return float(value) if math.isfinite(value) else None


def _layer_index(value: Any, where: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise SpearError(f"{where}: layer {value!r} is not an integer index; re-run `python -m spear.analyze`")
    return value


def _fill_missing(scores: dict[Any, float | None], what: str) -> dict[Any, float]:
    """Missing group scores (a layer without that module group) rank last: the lowest present score (0.0 if none)."""
    present = [s for s in scores.values() if s is not None]
    if len(present) < len(scores):
        missing = sorted(str(k) for k, s in scores.items() if s is None)
        log.warning("ranking: no %s score for %s; treated as the lowest score", what, ", ".join(missing[:8]))
    low = min(present) if present else 0.0
    return {k: (low if s is None else s) for k, s in scores.items()}


@dataclass(frozen=True)
class Ranking:
    """A validated ``ranking.json``: layer order (highest score first), scores, per-group scores."""

    num_layers: int
    order: tuple[int, ...]
    scores: dict[int, float]
    group_scores: dict[Unit, float] | None = None
    document: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)

    # --------------------------------------------------------------------------- reading
    @classmethod
    def from_document(cls, doc: Any, where: str = "ranking") -> Ranking:
        """Validate a ranking document. Needs ``layers[{layer, score}]``; ``order`` defaults to the
        scores sorted, ``num_layers`` to the number of entries; per-group scores come from
        ``layers[i].groups`` when every layer has them. A layer without a finite score is an error (the policies
        would otherwise place it arbitrarily); a missing group score ranks last."""
        if not isinstance(doc, Mapping):
            raise SpearError(f"{where} is not a ranking: its top level is a {type(doc).__name__}, not an object; "
                             "pass the ranking.json written by `python -m spear.analyze`")
        layers = doc.get("layers")
        if not isinstance(layers, list) or not layers:
            raise SpearError(f"{where} has no `layers` list; pass the ranking.json written by `python -m spear.analyze`")
        raw: dict[int, float | None] = {}
        raw_groups: dict[Unit, float | None] = {}
        for entry in layers:
            if not isinstance(entry, Mapping) or "layer" not in entry:
                raise SpearError(f"{where}: every `layers` entry needs a `layer` index")
            layer = _layer_index(entry["layer"], where)
            if layer in raw:
                raise SpearError(f"{where}: layer {layer} appears twice")
            raw[layer] = _score(entry.get("score"), f"{where} layer {layer}")
            groups = entry.get("groups")
            if isinstance(groups, Mapping):
                for group, score in groups.items():
                    raw_groups[Unit(layer, str(group))] = _score(score, f"{where} layer {layer} group {group}")
        num_layers = doc.get("num_layers", len(raw))
        if isinstance(num_layers, bool) or not isinstance(num_layers, int):
            raise SpearError(f"{where}: num_layers={num_layers!r} is not an integer")
        if sorted(raw) != list(range(num_layers)):
            raise SpearError(f"{where} scores layers {sorted(raw)} but names layers 0..{num_layers - 1}")
        undefined = [layer for layer, score in raw.items() if score is None]
        if undefined:
            impact = doc.get("impact", {}).get("name", "?") if isinstance(doc.get("impact"), Mapping) else "?"
            raise SpearError(f"{where}: layer {undefined[0]} has no finite score (NaN, infinite or null) under impact={impact}"
                             f"{f' ({len(undefined)} layers)' if len(undefined) > 1 else ''}; a ranking cannot place it: "
                             "check that layer's weights for NaN/Inf, or choose another impact")
        scores = {layer: float(score) for layer, score in raw.items() if score is not None}
        order = doc.get("order")
        if order is None:
            order = sorted(scores, key=lambda layer: (-scores[layer], layer))
        if not isinstance(order, list):
            raise SpearError(f"{where}: `order` must be a list of layer indices")
        order = [_layer_index(x, where) for x in order]
        if sorted(order) != list(range(num_layers)):
            raise SpearError(f"{where}: `order` must list every layer 0..{num_layers - 1} exactly once")
        group_scores = None
        if raw_groups and {u.layer for u in raw_groups} == set(raw):
            group_scores = _fill_missing(raw_groups, "group")
        return cls(num_layers, tuple(order), scores, group_scores, dict(doc))

    @classmethod
    def load(cls, source: str | Path, key: str = "ranking") -> Ranking:
        """A ranking from ``ranking.json`` or the run dir holding it; ``key`` is the config key that named it."""
        path = Path(str(source)).expanduser()
        if path.is_dir():
            path = path / RANKING_FILE
        if not path.is_file():
            raise SpearError(f"{key}={path} does not exist; give the ranking.json of `python -m spear.analyze` (or its run dir)")
        try:
            doc = json.loads(path.read_text(encoding="utf-8"))
        except UnicodeDecodeError:
            raise SpearError(f"{key}={path} is not UTF-8 text; give the ranking.json of `python -m spear.analyze`") from None
        except json.JSONDecodeError as err:
            raise SpearError(f"{key}={path} is not valid JSON ({err}); re-run `python -m spear.analyze`") from None
        return cls.from_document(doc, where=f"{key}={path}")

    # --------------------------------------------------------------------------- using
    @property
    def meta(self) -> dict[str, Any]:
        """Provenance recorded in the document: version, impact proxy, base and adapted paths."""
        return {k: self.document[k] for k in ("spear_version", "impact", "base", "adapted") if k in self.document}

    def check_layers(self, num_layers: int, key: str = "ranking") -> Ranking:
        if self.num_layers != num_layers:
            raise SpearError(f"the ranking ({key}) has {self.num_layers} layers but the model has {num_layers}; "
                             f"set {key} to the ranking.json of this model")
        return self

    def units(self, granularity: str) -> tuple[list[Unit], dict[Unit, float]]:
        """Units of a granularity, highest score first, with their scores (groups: ties by layer rank)."""
        if granularity == "layer":
            return [Unit(layer) for layer in self.order], {Unit(layer): s for layer, s in self.scores.items()}
        if self.group_scores is None:
            raise SpearError("policy.granularity=module needs per-group (attn/mlp) scores, which this ranking lacks; "
                             "re-run `python -m spear.analyze` or use policy.granularity=layer")
        rank_of = {layer: i for i, layer in enumerate(self.order)}
        scores = dict(self.group_scores)
        return sorted(scores, key=lambda u: (-scores[u], rank_of[u.layer], u.group)), scores

    def permuted(self, seed: int) -> Ranking:
        """The random-ranking control: the same entries (scores, group scores) given to layers in a
        seeded random order, so a policy yields the same multiset of ``t`` placed without the analysis."""
        layers = list(range(self.num_layers))
        target = list(layers)
        random.Random(seed).shuffle(target)
        moved = dict(zip(layers, target, strict=True))
        entries = [{**e, "layer": moved[int(e["layer"])]} for e in self.document["layers"]]
        doc = {
            "num_layers": self.num_layers,
            "order": [moved[layer] for layer in self.order],
            "layers": sorted(entries, key=lambda e: e["layer"]),
            "impact": {"name": "random_permutation", "params": {"seed": seed, "of": self.document.get("impact")}},
        }
        return Ranking.from_document(doc, where=f"the random permutation (seed {seed})")

    def save(self, path: Path) -> Path:
        from spear.io.atomic import write_json_atomic

        return write_json_atomic(Path(path), self.document)
