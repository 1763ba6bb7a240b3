"""Exports of an analysis for other tools: metrics.csv and an axolotl ``unfrozen_parameters`` YAML."""

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


def unfrozen_parameters_yaml(ranking: dict[str, Any], layer_map, k: int, extra: list[str] | None = None) -> str:
    """Axolotl-style ``unfrozen_parameters``: anchored regexes of the layers NOT in the top-``k``.

    The top-``k`` layers of the ranking are the ones to protect (freeze, or restore post hoc);
    every other decoder layer's projection matrices stay trainable. ``extra`` regexes (e.g.
    ``^lm_head\\.weight$``) are appended as given.
    """
    order = list(ranking["order"])
    k = max(0, min(int(k), len(order)))
    protected = sorted(order[:k])
    trainable = sorted(order[k:])
    lines = [
        "# spear-mm analyze: decoder layers to keep training, for trainers that take regexes",
        f"# (axolotl `unfrozen_parameters`). Impact: {ranking['impact']['name']}; protected (frozen) top-{k}:",
        f"# {protected}",
        "unfrozen_parameters:",
    ]
    for layer in trainable:
        lines.append(f"  - '{layer_map.matrix_regex(layer)}'")
    for rx in extra or []:
        lines.append("  - '" + str(rx).replace("'", "''") + "'")
    if len(lines) == 4:
        lines[-1] = "unfrozen_parameters: []"
    return "\n".join(lines) + "\n"
