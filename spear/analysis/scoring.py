"""Layer scores and the ranking (SPEC §1.3, §2.4).

Per metric column, each matrix's value becomes its percentile among the matrices of the same
module type (scale-free), and a layer's metric score is the mean over its matrices (or over one
group's matrices, ``attn``/``mlp``, for ``policy.granularity=module``). The impact score is a
weighted sum of named metric scores, ``impact.components`` (the options and their components are in
:mod:`spear.config.schema`). Ties are broken by layer index (lower first), so identical models still rank.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from spear.analysis.metrics import MatrixRow, MatrixTable, within_type_percentiles
from spear.errors import SpearError
from spear.models.layer_map import GROUPS


def _clean(x: float | None) -> float | None:
    """JSON-safe float: NaN/Inf -> None."""
    if x is None:
        return None
    x = float(x)
    return x if math.isfinite(x) else None


def percentile_table(table: MatrixTable, columns: list[str] | None = None) -> dict[str, list[float]]:
    """Within-module-type percentile of every matrix, per metric column."""
    return {c: within_type_percentiles(table.rows, table.column(c)) for c in (columns or table.columns)}


def layer_scores(
    rows: list[MatrixRow], pct: list[float], num_layers: int, group: str | None = None
) -> list[float | None]:
    """Mean percentile per layer over its matrices (of ``group`` only, when given); None if none."""
    sums = [0.0] * num_layers
    counts = [0] * num_layers
    for r, p in zip(rows, pct, strict=True):
        if group is None or r.group == group:
            sums[r.layer] += p
            counts[r.layer] += 1
    return [s / c if c else None for s, c in zip(sums, counts, strict=True)]


def check_components(components: dict[str, float], columns: list[str]) -> dict[str, float]:
    if not components:
        raise SpearError("impact.components is empty; give at least one metric column and weight, e.g. {swci: 1.0}")
    unknown = [c for c in components if c not in columns]
    if unknown:
        raise SpearError(
            f"impact.components names unknown metric(s) {', '.join(unknown)}; known: {', '.join(columns)}"
        )
    return {str(k): float(v) for k, v in components.items()}


def combine(metric_scores: dict[str, list[float | None]], components: dict[str, float]) -> list[float | None]:
    """``sum_c weight_c * score_c`` per layer (None where a component is None)."""
    n = len(next(iter(metric_scores.values())))
    out: list[float | None] = []
    for layer in range(n):
        vals = [metric_scores[c][layer] for c in components]
        out.append(None if any(v is None for v in vals) else sum(w * v for w, v in zip(components.values(), vals, strict=True)))
    return out


def order_layers(scores: list[float | None]) -> list[int]:
    """Layers by score, highest first; ties (and missing scores, last) broken by layer index."""
    return sorted(range(len(scores)), key=lambda i: (scores[i] is None, -(scores[i] or 0.0), i))


def spearman(x: list[float | None], y: list[float | None]) -> float | None:
    """Spearman rank correlation (average ranks for ties); None if undefined (constant input)."""
    from spear.analysis.metrics import percentile_ranks

    pairs = [(a, b) for a, b in zip(x, y, strict=True) if a is not None and b is not None]
    if len(pairs) < 3:
        return None
    rx = percentile_ranks([a for a, _ in pairs])
    ry = percentile_ranks([b for _, b in pairs])
    mx, my = sum(rx) / len(rx), sum(ry) / len(ry)
    cov = sum((a - mx) * (b - my) for a, b in zip(rx, ry, strict=True))
    vx = sum((a - mx) ** 2 for a in rx)
    vy = sum((b - my) ** 2 for b in ry)
    if vx == 0 or vy == 0:
        return None
    return cov / math.sqrt(vx * vy)


def score_layers(table: MatrixTable, components: dict[str, float]) -> dict[str, Any]:
    """Per-layer metric scores, impact score and per-group impact scores of a metric table."""
    components = check_components(components, table.columns)
    pct = percentile_table(table)
    metric_scores = {c: layer_scores(table.rows, pct[c], table.num_layers) for c in table.columns}
    group_scores = {
        g: combine({c: layer_scores(table.rows, pct[c], table.num_layers, g) for c in components}, components)
        for g in GROUPS
    }
    return {"metrics": metric_scores, "score": combine(metric_scores, components), "groups": group_scores}


def _raw_means(rows: list[MatrixRow], columns: list[str], num_layers: int) -> list[dict[str, float]]:
    out: list[dict[str, float]] = [dict.fromkeys(columns, 0.0) for _ in range(num_layers)]
    counts = [0] * num_layers
    for r in rows:
        counts[r.layer] += 1
        for c in columns:
            out[r.layer][c] += r.values[c]
    return [{c: _clean(v / counts[i]) if counts[i] else None for c, v in d.items()} for i, d in enumerate(out)]


def build_ranking(
    table: MatrixTable,
    *,
    impact_name: str,
    components: dict[str, float] | None,
    params: dict[str, Any],
    base_path: str,
    adapted_path: str,
    spear_version: str,
    score_override: list[float | None] | None = None,
    group_override: dict[str, list[float | None]] | None = None,
) -> dict[str, Any]:
    """The ranking.json document (SPEC §2.4) for a metric table.

    ``score_override`` (posterior) replaces the combined proxy score per layer; the cheap metric
    scores are still reported. Deterministic: same table -> same document.
    """
    comps = components or {}
    scored = score_layers(table, comps) if comps else score_layers(table, {"rel_change": 1.0})
    scores = score_override if score_override is not None else scored["score"]
    groups = group_override if group_override is not None else scored["groups"]
    order = order_layers(scores)
    rank = {layer: i + 1 for i, layer in enumerate(order)}
    raw = _raw_means(table.rows, table.columns, table.num_layers)
    by_layer: dict[int, dict[str, dict[str, float | None]]] = {}
    for r in table.rows:
        by_layer.setdefault(r.layer, {})[r.module] = {c: _clean(r.values[c]) for c in table.columns}
    layers = []
    for layer in range(table.num_layers):
        layers.append(
            {
                "layer": layer,
                "score": _clean(scores[layer]),
                "rank": rank[layer],
                "metrics": {c: _clean(scored["metrics"][c][layer]) for c in table.columns},
                "metrics_mean": raw[layer],
                "groups": {g: _clean(groups[g][layer]) for g in GROUPS},
                "modules": by_layer.get(layer, {}),
            }
        )
    group_order = {g: order_layers(groups[g]) for g in GROUPS}
    return {
        "spear_version": spear_version,
        "impact": {"name": impact_name, "params": params},
        "base": {"path": base_path},
        "adapted": {"path": adapted_path},
        "num_layers": table.num_layers,
        "order": order,
        "group_order": group_order,
        "layers": layers,
    }


def proxy_correlations(ranking_layers: list[dict[str, Any]], truth: list[float | None], presets: dict[str, dict[str, float]]) -> dict[str, float | None]:
    """Spearman correlation of each metric's layer score (and of each preset combination) with ``truth``."""
    columns = list(ranking_layers[0]["metrics"]) if ranking_layers else []
    out: dict[str, float | None] = {}
    for c in columns:
        out[c] = _clean(spearman([lay["metrics"][c] for lay in ranking_layers], truth))
    for name, comps in presets.items():
        if all(c in columns for c in comps):
            combo = [sum(w * lay["metrics"][c] for c, w in comps.items()) for lay in ranking_layers]
            out[f"impact:{name}"] = _clean(spearman(combo, truth))
    return out


def _namespace(d: dict[str, Any]):
    from types import SimpleNamespace

    return SimpleNamespace(**{k: _namespace(v) if isinstance(v, dict) else v for k, v in d.items()})


def layer_map_of(config: dict[str, Any]):
    """``layer_map_for`` on a config.json dict (no transformers import)."""
    from spear.models import layer_map_for

    if not config:
        raise SpearError("the model dir has no config.json; point to an HF model dir")
    return layer_map_for(_namespace(config))


def spectrum_snr_ranking(model_dir: Path, device: str = "auto") -> list[int]:
    """Layers of one model by Spectrum SNR, highest first (for the train stage's freeze masks).

    Each matrix's Spectrum ``snr`` becomes its percentile within its module type, averaged per
    layer; ties go to the lower layer index. Streams the checkpoint (one model, batched spectra
    with the ``spectra`` group's defaults).
    """
    from spear.analysis.metrics import compute_single
    from spear.config.schema import SpectraConfig
    from spear.io.reader import Checkpoint

    spectra = SpectraConfig()
    ckpt = Checkpoint(Path(model_dir))
    layer_map = layer_map_of(ckpt.config)
    rows = compute_single(ckpt, layer_map, metric="snr", method=spectra.method, device=device,
                          batch_bytes=int(spectra.batch_mb * (1 << 20)))
    pct = within_type_percentiles(rows, [r.values["snr_base"] for r in rows])
    return order_layers(layer_scores(rows, pct, layer_map.num_layers))
