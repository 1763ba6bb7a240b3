"""``python -m spear.analyze adapted=<model>``: score and rank decoder layers (SPEC §1.2-1.4, §2.4).

Streams ``base`` and ``adapted`` tensor pairs (same-shape batches, never two whole models),
computes each matrix's spectra once and every metric from them, turns them into layer scores
(``impact`` config group), and writes ``ranking.json``, ``metrics.csv``, ``layer_scores.png``,
``unfrozen_parameters.yaml`` and ``timing.json`` (wall-clock and memory; kept out of
ranking.json so that the ranking is bit-identical for the same inputs).
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

from spear.cli import hydra_entry, required_ref

log = logging.getLogger(__name__)


def impact_params(cfg, table_params: dict[str, Any]) -> dict[str, Any]:
    """``impact.params`` of ranking.json: everything the scores depend on, metric versions included."""
    from omegaconf import OmegaConf

    from spear.analysis.metrics import versions

    impact = OmegaConf.to_container(cfg.impact, resolve=True)
    params: dict[str, Any] = {
        "components": {str(k): float(v) for k, v in (impact.get("components") or {}).items()},
        "aggregation": "mean within-module-type percentile per layer; score = sum weight * component",
        "tie_break": "lower layer index first",
        "metrics": {k: table_params[k] for k in sorted(table_params) if k != "spectra_method"},
        "spectra_method": table_params["spectra_method"],
        "metric_versions": versions(),
    }
    if impact.get("name") == "posterior":
        params["posterior"] = OmegaConf.to_container(cfg.posterior, resolve=True)
    return params


def analyze_pair(cfg, base_dir: Path, adapted_dir: Path):
    """(metric table, layer map, reader) of a base/adapted pair, streaming."""
    from spear.analysis.metrics import compute_table, resolve_workers
    from spear.analysis.scoring import layer_map_of
    from spear.io.reader import TensorPairReader

    reader = TensorPairReader(base_dir, adapted_dir)
    layer_map = layer_map_of(reader.config)
    params = {
        "seed": int(cfg.get("seed", 0)),
        "swci_importance": str(cfg.metrics.swci_importance),
        "svdr_threshold": str(cfg.metrics.svdr_threshold),
        "position_mode": str(cfg.metrics.position_mode),
    }
    table = compute_table(
        reader,
        layer_map,
        params=params,
        method=str(cfg.spectra.method),
        device=str(cfg.get("device", "auto")),
        batch_bytes=int(float(cfg.spectra.batch_mb) * (1 << 20)),
        progress=bool(cfg.get("progress", True)),
        workers=resolve_workers(cfg.spectra.get("workers", "auto")),
    )
    return table, layer_map, reader


def run(cfg) -> dict[str, Any]:
    import spear
    from spear.analysis.exports import unfrozen_parameters_yaml, write_metrics_csv
    from spear.analysis.plots import plot_layer_scores
    from spear.analysis.scoring import build_ranking
    from spear.io.atomic import write_json_atomic, write_text_atomic
    from spear.merging.streaming import peak_rss_bytes
    from spear.models import resolve_model_dir
    from spear.tracking import start_tracker

    t0 = time.perf_counter()
    out_dir = Path(cfg.paths.output_dir)
    allow_pickle = bool(cfg.get("allow_pickle", False))
    base_ref, adapted_ref = required_ref(cfg, "base"), required_ref(cfg, "adapted")
    base_dir = resolve_model_dir(base_ref, allow_pickle=allow_pickle).resolve()
    adapted_dir = resolve_model_dir(adapted_ref, allow_pickle=allow_pickle).resolve()
    impact_name = str(cfg.impact.name)
    timing: dict[str, float] = {}

    log.info("analyze: base %s vs adapted %s (impact=%s)", base_dir, adapted_dir, impact_name)
    t = time.perf_counter()
    table, layer_map, reader = analyze_pair(cfg, base_dir, adapted_dir)
    timing["spectra"] = time.perf_counter() - t

    params = impact_params(cfg, table.params)
    components = params["components"]
    common = {
        "impact_name": impact_name,
        "components": components,
        "params": params,
        "base_path": str(base_dir),
        "adapted_path": str(adapted_dir),
        "spear_version": spear.__version__,
    }
    posterior_result = None
    if impact_name == "posterior":
        from spear.analysis.posterior import measure_posterior

        t = time.perf_counter()
        posterior_result = measure_posterior(cfg, base_dir, adapted_dir, layer_map)
        timing["posterior"] = time.perf_counter() - t
    t = time.perf_counter()
    if posterior_result is None:
        ranking = build_ranking(table, **common)
    else:
        from spear.analysis.posterior import attach_posterior

        ranking = build_ranking(
            table, **common, score_override=posterior_result["score"], group_override=posterior_result.get("groups")
        )
        attach_posterior(ranking, posterior_result)
    timing["scoring"] = time.perf_counter() - t

    t = time.perf_counter()
    out_dir.mkdir(parents=True, exist_ok=True)
    ranking_path = write_json_atomic(out_dir / "ranking.json", ranking)
    csv_path = write_metrics_csv(table, out_dir / "metrics.csv")
    unfrozen_path = write_text_atomic(
        out_dir / "unfrozen_parameters.yaml",
        unfrozen_parameters_yaml(ranking, layer_map, int(cfg.get("unfrozen_k", 8)), list(cfg.get("unfrozen_extra") or [])),
    )
    png_path = plot_layer_scores(table, ranking, out_dir / "layer_scores.png")
    timing["outputs"] = time.perf_counter() - t
    timing["total"] = time.perf_counter() - t0
    timing_doc = {
        "seconds": timing,
        "bytes_read": reader.bytes_read,
        "peak_rss_bytes": peak_rss_bytes(),
        "matrices": len(table.rows),
        "spectra_method": table.params["spectra_method"],
    }
    write_json_atomic(out_dir / "timing.json", timing_doc)

    top = ranking["order"][: max(1, min(5, len(ranking["order"])))]
    log.info("analyze: %d layers ranked by %s; restore first: %s (%.1fs)", ranking["num_layers"], impact_name, top, timing["total"])
    if "proxy_vs_posterior" in ranking:
        for name, rho in ranking["proxy_vs_posterior"].items():
            log.info("proxy_vs_posterior %-22s spearman %s", name, "n/a" if rho is None else f"{rho:+.3f}")

    tracker = start_tracker(cfg, "analyze")
    try:
        tracker.log({"analyze/seconds": timing["total"], "analyze/num_layers": ranking["num_layers"]})
        tracker.log_table(
            "analyze/layers",
            [
                {"layer": lay["layer"], "score": lay["score"], "rank": lay["rank"], **lay["groups"], **lay["metrics"]}
                for lay in ranking["layers"]
            ],
        )
        tracker.log_table(
            "analyze/matrices", [{"name": r.name, "layer": r.layer, "module": r.module, **r.values} for r in table.rows]
        )
        if "proxy_vs_posterior" in ranking:
            tracker.log_table("analyze/proxy_vs_posterior", [{"proxy": k, "spearman": v} for k, v in ranking["proxy_vs_posterior"].items()])
        tracker.log_image("analyze/layer_scores", png_path)
    finally:
        tracker.finish()

    return {
        "output_dir": str(out_dir),
        "ranking_path": str(ranking_path),
        "metrics_csv": str(csv_path),
        "layer_scores_png": str(png_path),
        "unfrozen_parameters": str(unfrozen_path),
        "order": ranking["order"],
        "impact": impact_name,
        "seconds": timing["total"],
        "peak_rss_bytes": timing_doc["peak_rss_bytes"],
    }


main = hydra_entry("analyze", run)

if __name__ == "__main__":
    main()
