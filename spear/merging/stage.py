"""The merge stage: restore the adapted model toward the base by policy (SPEC §1.5, §2.5).

The restoration strength ``t`` goes one step per function: the ``policy`` config and the ranking
give a :class:`~spear.merging.plan.TMap` (:func:`~spear.merging.policies.build_tmap`; for
``target_retention`` scaled by :func:`~spear.merging.target.search_target`), the TMap and the
``merge`` config give each tensor's step (:meth:`~spear.merging.plan.MergePlan.build`), and the
streaming writer applies them (:func:`~spear.merging.streaming.merge_checkpoints`). Writes into the
run dir ``model/`` (safetensors shards, config, tokenizer of the adapted model),
``merge_report.json`` and ``mergekit.yaml`` (an equivalent mergekit config, for every kernel
mergekit has).
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

from spear.analysis.ranking import Ranking
from spear.analysis.stage import model_dirs, rank_pair
from spear.config import save_run_config
from spear.config.schema import NEEDS_RANKING
from spear.io.atomic import check_completed, check_output_free, write_json_atomic
from spear.io.reader import Checkpoint
from spear.merging.exports import mergekit_config, write_mergekit_yaml
from spear.merging.policies import build_tmap
from spear.merging.streaming import layer_map_of_dir_config, merge_checkpoints
from spear.models.card import write_merge_card
from spear.runtime import peak_rss_bytes, resolve_device
from spear.tracking import start_tracker

log = logging.getLogger(__name__)


def ranking_of(cfg, base_dir: Path, adapted_dir: Path) -> tuple[Ranking | None, dict[str, Any] | None]:
    """The ranking the policy needs: ``ranking=`` when given, else ranked here (``info["computed"]``: the caller
    writes it to the run dir once the policy has accepted it, so a refused policy leaves nothing behind)."""
    if cfg.policy.name not in NEEDS_RANKING:
        return None, None
    if cfg.ranking:
        ranking = Ranking.load(cfg.ranking)
        info = {"path": str(Path(cfg.ranking).expanduser().resolve()), **ranking.meta}
    else:
        log.info("merge: no ranking given; ranking layers with impact=%s", cfg.impact.name)
        ranking = rank_pair(cfg, base_dir, adapted_dir)
        info = {"path": None, "computed": True, **ranking.meta}
    for side, path in (("base", base_dir), ("adapted", adapted_dir)):
        recorded = (ranking.meta.get(side) or {}).get("path")
        if recorded and Path(recorded).resolve() != path.resolve():
            log.warning("merge: the ranking was computed for %s=%s, not %s", side, recorded, path)
    return ranking, info


def restoration(cfg, base_dir: Path, adapted_dir: Path, out_dir: Path, num_layers: int):
    """(TMap, ranking info, record of how a loaded model found the map: ``{"search": ...}``, ``{"fit": ...}`` or ``{}``)."""
    from spear.merging.policies import FITTED

    ranking, info = ranking_of(cfg, base_dir, adapted_dir)
    if cfg.policy.name not in (*FITTED, "target_retention"):
        tmap = build_tmap(ranking, cfg.policy, num_layers)
        return tmap, _saved(ranking, info, out_dir), {}
    from spear.models import load_model

    model, tokenizer = load_model(str(adapted_dir), **cfg.model.load_options())  # only these policies load a model
    model.to(resolve_device(cfg.device))
    if cfg.policy.name == "optimized":
        from spear.merging.optimize import fit_tmap

        tmap, fit = fit_tmap(model, tokenizer, base_dir, cfg.policy, cfg.proxy, cfg.merge, progress=cfg.progress)
        return tmap, _saved(ranking, info, out_dir), {"fit": fit}
    from spear.merging.target import search_target

    tmap, search = search_target(build_tmap(ranking, cfg.policy, num_layers), model, tokenizer, base_dir, cfg.policy,
                                 cfg.proxy, cfg.merge)
    return tmap, _saved(ranking, info, out_dir), {"search": search}


def _saved(ranking: Ranking | None, info: dict[str, Any] | None, out_dir: Path) -> dict[str, Any] | None:
    """``info`` with the path of a ranking computed here, written to the run dir now that the policy accepted it."""
    if ranking is None or info is None or not info.get("computed"):
        return info
    out_dir.mkdir(parents=True, exist_ok=True)
    return {**info, "path": str(ranking.save(out_dir / "ranking.json"))}


def run_merge(cfg) -> dict[str, Any]:
    """Merge as configured and write ``model/``, ``merge_report.json`` and ``mergekit.yaml``."""
    t0 = time.perf_counter()
    out_dir = Path(cfg.paths.output_dir)
    model_out = out_dir / "model"
    check_completed(model_out, out_dir / "merge_report.json", cfg.overwrite)
    check_output_free(model_out, cfg.overwrite)
    base_dir, adapted_dir = model_dirs(cfg)
    adapted_ckpt = Checkpoint(adapted_dir)
    num_layers = layer_map_of_dir_config(adapted_ckpt.config).num_layers
    tmap, ranking_info, found = restoration(cfg, base_dir, adapted_dir, out_dir, num_layers)
    log.info("merge: policy=%s kernel=%s mean t=%.3f layer t=%s", cfg.policy.name, cfg.merge.name, tmap.mean_t(num_layers),
             [round(tmap.layer_t.get(i, 0.0), 3) for i in range(num_layers)])  # fmt: skip

    result = merge_checkpoints(base_dir, adapted_dir, model_out, tmap, cfg.merge, overwrite=cfg.overwrite, progress=cfg.progress,
                               copy_code=cfg.model.trust_remote_code)
    kernel_params = cfg.merge.kernel_params()
    report: dict[str, Any] = {
        "policy": cfg.policy.model_dump(),
        "method": cfg.merge.name,
        "kernel_params": kernel_params,
        "layer_t": result["layer_t"],
        "group_t": tmap.to_json()["group_t"],
        "non_layer_t": tmap.non_layer_t,
        "mean_t": tmap.mean_t(num_layers),
        "tensors": result["tensors"],
        "bytes_read": result["bytes_read"],
        "bytes_written": result["bytes_written"],
        "seconds": time.perf_counter() - t0,
        "merge_seconds": result["seconds"],
        "peak_rss_bytes": peak_rss_bytes(),
        "base": {"path": str(base_dir)},
        "adapted": {"path": str(adapted_dir)},
        "ranking": ranking_info,
        "files": result["files"],
        "sha256": result["sha256"],
        "tokenizer_from": result["tokenizer_from"],
        "code_files": result["code_files"],
        "fallbacks": sum(1 for s in result["tensors"].values() if s.get("fallback")),
    }
    report.update(found)
    out_dtype = adapted_ckpt.dtype(adapted_ckpt.names[0]) if adapted_ckpt.names else "F32"
    mk = mergekit_config(tmap, base=str(base_dir), adapted=str(adapted_dir), num_layers=num_layers,
                         kernel=cfg.merge.name, kernel_params=kernel_params, out_dtype=out_dtype)
    mk_path = None if mk is None else write_mergekit_yaml(out_dir / "mergekit.yaml", mk, kernel=cfg.merge.name,
                                                          dot_threshold=kernel_params.get("dot_threshold"))
    report["mergekit"] = None if mk_path is None else mk_path.name  # null: mergekit has no such kernel
    config_yaml = save_run_config(cfg, out_dir)
    report["card"] = str(write_merge_card(model_out, report, base_dir, adapted_dir, config_yaml).relative_to(out_dir))
    report_path = write_json_atomic(out_dir / "merge_report.json", report)  # the completion marker: last
    log.info("merge: wrote %s (%d tensors, %.1f MB) in %.1fs, peak RSS %.0f MB", model_out, len(result["tensors"]),
             result["bytes_written"] / 1e6, report["seconds"], report["peak_rss_bytes"] / 1e6)  # fmt: skip

    tracker = start_tracker(cfg)
    try:
        tracker.log({
            "merge/seconds": report["seconds"], "merge/mean_t": report["mean_t"],
            "merge/bytes_written": report["bytes_written"], "merge/peak_rss_bytes": report["peak_rss_bytes"],
            "merge/fallbacks": report["fallbacks"],
        })  # fmt: skip
        tracker.log_table("merge/layer_t", [{"layer": int(k), "t": v} for k, v in report["layer_t"].items()])
    finally:
        tracker.finish()
    return {
        "output_dir": str(out_dir),
        "model_dir": str(model_out),
        "report_path": str(report_path),
        "mergekit_path": None if mk_path is None else str(mk_path),
        "policy": cfg.policy.name,
        "method": cfg.merge.name,
        "layer_t": report["layer_t"],
        "mean_t": report["mean_t"],
        "seconds": report["seconds"],
        "peak_rss_bytes": report["peak_rss_bytes"],
        **found,
    }
