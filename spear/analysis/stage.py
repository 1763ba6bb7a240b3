"""The analysis stage: score and rank the decoder layers of a base/adapted pair (SPEC §1.2-1.4, §2.4).

Streams ``base`` and ``adapted`` tensor pairs (same-shape batches, never two whole models),
computes each matrix's spectra once and every metric from them, turns them into layer scores
(``impact``), and writes ``ranking.json``, ``metrics.csv``, ``layer_scores.png``,
``unfrozen_parameters.yaml`` and ``trainable_parameters.txt`` (the freeze mask of the top ``unfrozen_k``
layers for other trainers), ``timing.json`` (wall-clock and memory; kept out of ranking.json
so that the ranking is bit-identical for the same inputs). :func:`rank_pair` is the same ranking
for the merge stage when it is given none.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import spear
from spear.analysis.ranking import Ranking
from spear.errors import SpearError

log = logging.getLogger(__name__)
MEASURED = ("posterior", "grad_delta")  # impacts that load the adapted model and measure instead of estimating


def model_dirs(cfg) -> tuple[Path, Path]:
    """The local HF safetensors dirs of ``base`` and ``adapted`` (analysis and merge stream safetensors,
    so pickle weights are refused here whatever ``model.allow_pickle`` says, with the way to convert them)."""
    from spear.models import resolve_model_dir

    dirs = []
    for key in ("base", "adapted"):
        path = resolve_model_dir(getattr(cfg, key), allow_pickle=True, allow_network=cfg.model.allow_network).resolve()
        if not any(path.glob("*.safetensors")):
            raise SpearError(f"{key}={path} holds no safetensors weights; analysis and merge stream safetensors only: "
                             "convert it (load it with transformers and save_pretrained(dir), which writes safetensors)")
        dirs.append(path)
    return dirs[0], dirs[1]


def analyze_pair(cfg, base_dir: Path, adapted_dir: Path):
    """(metric table, layer map, reader) of a base/adapted pair, streaming."""
    from spear.analysis.metrics import compute_table, resolve_workers
    from spear.analysis.scoring import layer_map_of
    from spear.io.reader import TensorPairReader

    reader = TensorPairReader(base_dir, adapted_dir)
    layer_map = layer_map_of(reader.config)
    table = compute_table(
        reader,
        layer_map,
        params={"seed": cfg.seed, **cfg.metrics.model_dump()},
        method=cfg.spectra.method,
        device=cfg.device,
        batch_bytes=int(cfg.spectra.batch_mb * (1 << 20)),
        progress=cfg.progress,
        workers=resolve_workers(cfg.spectra.workers),
    )
    # the small tensors the spectra do not read (norms, biases) must be finite too; embeddings are checked by
    # every stage that loads or merges them (reading them here would double the analysis' peak memory)
    for name in reader.names:
        if len(reader.base.shape(name)) < 2:
            reader.read(name)
    return table, layer_map, reader


def impact_params(cfg, table_params: dict[str, Any]) -> dict[str, Any]:
    """``impact.params`` of ranking.json: everything the scores depend on, metric versions included."""
    from spear.analysis.metrics import versions

    params: dict[str, Any] = {
        "components": dict(cfg.impact.components),
        "aggregation": "mean within-module-type percentile per layer; score = sum weight * component",
        "tie_break": "lower layer index first",
        "metrics": {k: table_params[k] for k in sorted(table_params) if k != "spectra_method"},
        "spectra_method": table_params["spectra_method"],
        "metric_versions": versions(),
    }
    if cfg.impact.name == "posterior":
        params["posterior"] = {"domain_weight": cfg.impact.domain_weight, "groups": cfg.impact.groups,
                               "proxy": cfg.proxy.model_dump(), "merge": cfg.merge.model_dump()}
    if cfg.impact.name == "grad_delta":
        params["grad_delta"] = {"domain_weight": cfg.impact.domain_weight, "calibration_tokens": cfg.impact.calibration_tokens,
                                "proxy": cfg.proxy.model_dump()}
    return params


def _ranking_document(cfg, table, base_dir: Path, adapted_dir: Path, **overrides: Any) -> dict[str, Any]:
    from spear.analysis.scoring import build_ranking

    return build_ranking(
        table, impact_name=cfg.impact.name, components=dict(cfg.impact.components),
        params=impact_params(cfg, table.params), base_path=str(base_dir), adapted_path=str(adapted_dir),
        spear_version=spear.__version__, **overrides,
    )


def rank_pair(cfg, base_dir: Path, adapted_dir: Path) -> Ranking:
    """The cheap-proxy ranking of a pair (``impact``, ``spectra``, ``metrics``): what merge uses without one."""
    if cfg.impact.name in MEASURED:
        raise SpearError(f"impact={cfg.impact.name} loads the model to measure; run `python -m spear.analyze "
                         f"impact={cfg.impact.name}` and pass ranking=<its ranking.json>")
    table, _, _ = analyze_pair(cfg, base_dir, adapted_dir)
    return Ranking.from_document(_ranking_document(cfg, table, base_dir, adapted_dir))


def run_analyze(cfg) -> dict[str, Any]:
    """Rank ``adapted`` against ``base`` and write the analysis outputs into the run dir."""
    from spear.analysis.exports import (
        protect_top_k,
        trainable_parameters_txt,
        unfrozen_parameters_yaml,
        write_metrics_csv,
    )
    from spear.analysis.plots import plot_layer_scores
    from spear.config import save_run_config
    from spear.io.atomic import write_json_atomic, write_text_atomic
    from spear.runtime import peak_rss_bytes
    from spear.tracking import start_tracker

    t0 = time.perf_counter()
    out_dir = Path(cfg.paths.output_dir)
    base_dir, adapted_dir = model_dirs(cfg)
    timing: dict[str, float] = {}
    log.info("analyze: base %s vs adapted %s (impact=%s)", base_dir, adapted_dir, cfg.impact.name)
    t = time.perf_counter()
    table, layer_map, reader = analyze_pair(cfg, base_dir, adapted_dir)
    timing["spectra"] = time.perf_counter() - t

    measured = None
    if cfg.impact.name in MEASURED:
        from spear.analysis.gradient import measure_grad_delta
        from spear.analysis.posterior import measure_posterior

        t = time.perf_counter()
        measure = measure_posterior if cfg.impact.name == "posterior" else measure_grad_delta
        measured = measure(cfg, base_dir, adapted_dir, layer_map)
        timing[cfg.impact.name] = time.perf_counter() - t
    t = time.perf_counter()
    if measured is None:
        doc = _ranking_document(cfg, table, base_dir, adapted_dir)
    else:
        from spear.analysis.posterior import attach_measured

        doc = attach_measured(_ranking_document(cfg, table, base_dir, adapted_dir, score_override=measured["score"],
                                                group_override=measured.get("groups")), measured, cfg.impact.name)
    ranking = Ranking.from_document(doc)
    timing["scoring"] = time.perf_counter() - t

    t = time.perf_counter()
    out_dir.mkdir(parents=True, exist_ok=True)
    save_run_config(cfg, out_dir)
    ranking_path = ranking.save(out_dir / "ranking.json")
    csv_path = write_metrics_csv(table, out_dir / "metrics.csv")
    mask = protect_top_k(doc, layer_map, reader.base.names, cfg.unfrozen_k)
    unfrozen_path = write_text_atomic(out_dir / "unfrozen_parameters.yaml",
                                      unfrozen_parameters_yaml(doc, mask, layer_map, list(cfg.unfrozen_extra)))
    write_text_atomic(out_dir / "trainable_parameters.txt", trainable_parameters_txt(mask))
    png_path = plot_layer_scores(table, doc, out_dir / "layer_scores.png")
    timing["outputs"] = time.perf_counter() - t
    timing["total"] = time.perf_counter() - t0
    timing_doc = {"seconds": timing, "bytes_read": reader.bytes_read, "peak_rss_bytes": peak_rss_bytes(),
                  "matrices": len(table.rows), "spectra_method": table.params["spectra_method"]}
    write_json_atomic(out_dir / "timing.json", timing_doc)

    log.info("analyze: %d layers ranked by %s; restore first: %s (%.1fs)", ranking.num_layers, cfg.impact.name,
             list(ranking.order[:5]), timing["total"])
    for name, rho in (doc.get("proxy_vs_posterior") or {}).items():
        log.info("proxy_vs_posterior %-22s spearman %s", name, "n/a" if rho is None else f"{rho:+.3f}")

    tracker = start_tracker(cfg)
    try:
        tracker.log({"analyze/seconds": timing["total"], "analyze/num_layers": ranking.num_layers})
        tracker.log_table("analyze/layers", [
            {"layer": lay["layer"], "score": lay["score"], "rank": lay["rank"], **lay["groups"], **lay["metrics"]}
            for lay in doc["layers"]
        ])
        tracker.log_table("analyze/matrices", [{"name": r.name, "layer": r.layer, "module": r.module, **r.values} for r in table.rows])
        if "proxy_vs_posterior" in doc:
            tracker.log_table("analyze/proxy_vs_posterior", [{"proxy": k, "spearman": v} for k, v in doc["proxy_vs_posterior"].items()])
        tracker.log_image("analyze/layer_scores", png_path)
    finally:
        tracker.finish()
    return {
        "output_dir": str(out_dir),
        "ranking_path": str(ranking_path),
        "metrics_csv": str(csv_path),
        "layer_scores_png": str(png_path),
        "unfrozen_parameters": str(unfrozen_path),
        "order": list(ranking.order),
        "impact": cfg.impact.name,
        "seconds": timing["total"],
        "peak_rss_bytes": timing_doc["peak_rss_bytes"],
    }
