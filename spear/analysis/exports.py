"""Exports of an analysis for other tools: metrics.csv, and the freeze mask of the top layers as an axolotl
``unfrozen_parameters`` YAML and a plain parameter-name list."""

from __future__ import annotations

import csv
import io
from pathlib import Path
from typing import Any

from spear.analysis.metrics import MatrixTable
from spear.io.atomic import write_text_atomic


def metrics_csv_text(table: MatrixTable) -> str:
    """metrics.csv (SPEC §2.4): name, layer, module, then one column per metric."""
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(["name", "layer", "module", *table.columns])
    for r in table.rows:
        writer.writerow([r.name, r.layer, r.module, *(repr(float(r.values[c])) for c in table.columns)])
    return buf.getvalue()


def write_metrics_csv(table: MatrixTable, path: Path) -> Path:
    return write_text_atomic(path, metrics_csv_text(table))


def protect_top_k(ranking: dict[str, Any], layer_map, names: list[str], k: int):
    """The freeze plan of the next CPT that protects the ranking's top-``k`` layers: exactly what
    ``spear.train freeze=ranked freeze.k=k freeze.ranking=<ranking.json>`` trains (:mod:`spear.cpt.freeze`)."""
    from spear.config.schema import FreezeConfig
    from spear.cpt.freeze import plan_freeze

    k = max(0, min(int(k), len(ranking["order"])))
    return plan_freeze(FreezeConfig(mode="ranked", k=k), layer_map, names, ranking=list(ranking["order"]),
                       ranking_source="ranking.json")


def unfrozen_parameters_yaml(ranking: dict[str, Any], plan, layer_map, extra: list[str] | None = None) -> str:
    """Axolotl's ``unfrozen_parameters`` for ``plan``: anchored regexes whose matches are its trainable set.

    A trainable decoder layer is one regex for all its parameters; every other trainable parameter
    (embeddings, final norm) is its own anchored name. ``extra`` regexes are appended as given.
    """
    import re

    trainable = set(plan.trainable_params)
    layers = sorted({layer_map.layer_of(n) for n in trainable} - {None})
    whole = [layer for layer in layers if all(n in trainable for n in plan.frozen_params + plan.trainable_params
                                              if layer_map.layer_of(n) == layer)]
    patterns = [rf"^{layer_map.layers_prefix}{layer}\..+$" for layer in whole]
    patterns += [f"^{re.escape(n)}$" for n in plan.trainable_params if layer_map.layer_of(n) not in whole]
    lines = [
        "# spear-mm analyze: what the next CPT trains when the ranking's top layers are protected, for trainers",
        f"# that take regexes (axolotl `unfrozen_parameters`). Impact: {ranking['impact']['name']}; frozen layers:",
        f"# {list(plan.frozen_layers)} (= spear.train freeze=ranked freeze.k={len(plan.frozen_layers)})",
        "unfrozen_parameters:",
    ]
    lines += ["  - '" + str(rx).replace("'", "''") + "'" for rx in [*patterns, *(extra or [])]]
    if len(lines) == 4:
        lines[-1] = "unfrozen_parameters: []"
    return "\n".join(lines) + "\n"


def trainable_parameters_txt(plan) -> str:
    """One trainable parameter name per line (``requires_grad_`` in plain PyTorch / HF Trainer code)."""
    return "".join(f"{name}\n" for name in plan.trainable_params)
