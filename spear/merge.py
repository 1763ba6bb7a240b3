"""``python -m spear.merge adapted=<model> ranking=<ranking.json>``: restore by policy (SPEC §1.5, §2.5).

Maps the layer ranking to restoration strengths with ``policy`` (``policy.*``), merges the
adapted model toward the base tensor by tensor with the ``merge`` kernel (streaming, bounded
memory, atomic output), and writes into the run dir:

* ``model/``: the restored HF model (safetensors shards, config, tokenizer of the adapted model);
* ``merge_report.json``: policy, method, per-layer ``t``, per-tensor statistics, bytes, time, memory;
* ``mergekit.yaml``: an equivalent mergekit config (``mergekit-yaml mergekit.yaml OUT``).

Without ``ranking`` a policy that needs one computes it first with the ``impact`` group (the
analysis defaults of ``conf/analyze.yaml``; ``ranking.json`` is written to the run dir too).
``policy=target_retention`` loads the adapted model and searches the strength in memory first.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

from spear.cli import hydra_entry, required_ref
from spear.errors import SpearError

log = logging.getLogger(__name__)


def _container(node) -> dict[str, Any]:
    from omegaconf import OmegaConf

    return OmegaConf.to_container(node, resolve=True) if node is not None else {}


def kernel_settings(merge_cfg: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    """(kernel name, the kernel's own parameters) of the ``merge`` group."""
    from spear.merging.kernels import KERNEL_PARAMS, check_kernel

    name = str(merge_cfg.get("name", "slerp"))
    check_kernel(name)
    params = {k: merge_cfg[k] for k in KERNEL_PARAMS[name] if k in merge_cfg}
    if params.get("dot_threshold") is not None:
        dt = float(params["dot_threshold"])
        if not 0.0 < dt <= 1.0:
            raise SpearError(f"merge.dot_threshold={dt} must be in (0, 1] (mergekit uses 0.9995), or null")
        params["dot_threshold"] = dt
    return name, params


def compute_ranking(cfg, base_dir: Path, adapted_dir: Path, out_dir: Path) -> dict[str, Any]:
    """Rank layers with the analysis stage's code (``impact`` group, analyze.yaml defaults)."""
    from omegaconf import OmegaConf

    import spear
    from spear.analysis.scoring import build_ranking
    from spear.analyze import analyze_pair, impact_params
    from spear.io.atomic import write_json_atomic
    from spear.paths import CONF_DIR

    if cfg.get("impact") is None:
        raise SpearError("no ranking given and no `impact` config; set ranking=<ranking.json> (from `python -m spear.analyze`)")
    if str(cfg.impact.get("name")) == "posterior":
        raise SpearError(
            "impact=posterior is measured by `python -m spear.analyze impact=posterior`; run it and pass ranking=<its ranking.json>"
        )
    defaults = OmegaConf.load(CONF_DIR / "analyze.yaml")
    for key in ("defaults", "hydra", "adapted", "base", "task_name"):
        defaults.pop(key, None)
    acfg = OmegaConf.merge(
        defaults,
        {"impact": cfg.impact, "base": str(base_dir), "adapted": str(adapted_dir), "progress": bool(cfg.merge.get("progress", True))},
    )
    log.info("merge: no ranking given; ranking layers with impact=%s", cfg.impact.name)
    table, _, _ = analyze_pair(acfg, base_dir, adapted_dir)
    params = impact_params(acfg, table.params)
    ranking = build_ranking(
        table,
        impact_name=str(cfg.impact.name),
        components=params["components"],
        params=params,
        base_path=str(base_dir),
        adapted_path=str(adapted_dir),
        spear_version=spear.__version__,
    )
    write_json_atomic(out_dir / "ranking.json", ranking)
    return ranking


def resolve_tmap(cfg, policy: dict[str, Any], base_dir: Path, adapted_dir: Path, out_dir: Path, num_layers: int,
                 kernel: str, kernel_params: dict[str, Any]):  # fmt: skip
    """(TMap, ranking info, search record or None) for the configured policy."""
    from spear.merging.policies import build_tmap, load_ranking, needs_ranking

    ranking = None
    ranking_info: dict[str, Any] | None = None
    if needs_ranking(policy):
        if cfg.get("ranking"):
            ranking = load_ranking(str(cfg.ranking))
            ranking_info = {"path": str(Path(str(cfg.ranking)).expanduser().resolve()), **ranking.meta}
        else:
            ranking = load_ranking(compute_ranking(cfg, base_dir, adapted_dir, out_dir))
            ranking_info = {"path": str(out_dir / "ranking.json"), "computed": True, **ranking.meta}
        for side, path in (("base", base_dir), ("adapted", adapted_dir)):
            recorded = (ranking.meta.get(side) or {}).get("path")
            if recorded and Path(recorded).resolve() != path.resolve():
                log.warning("merge: the ranking was computed for %s=%s, not %s", side, recorded, path)
    tmap = build_tmap(ranking, policy, num_layers)
    search = None
    if policy.get("name") == "target_retention":
        from spear.merging.target import general_token_ids, search_target
        from spear.models import load_model

        model, tokenizer = load_model(str(adapted_dir), dtype=str(policy.get("dtype", "float32")))
        ids = general_token_ids(tokenizer, policy)
        tmap, search = search_target(tmap, model, ids, base_dir, policy, kernel=kernel, kernel_params=kernel_params)
        del model
    return tmap, ranking_info, search


def run(cfg) -> dict[str, Any]:
    from spear.io.atomic import write_json_atomic
    from spear.io.reader import Checkpoint
    from spear.merging.exports import mergekit_config, write_mergekit_yaml
    from spear.merging.streaming import layer_map_of_dir_config, merge_checkpoints, peak_rss_bytes
    from spear.models import resolve_model_dir
    from spear.tracking import start_tracker

    t0 = time.perf_counter()
    out_dir = Path(cfg.paths.output_dir)
    model_out = out_dir / "model"
    overwrite = bool(cfg.get("overwrite", False))
    if model_out.exists() and not overwrite:
        raise SpearError(f"output {model_out} already exists; set overwrite=true to replace it, or choose another run dir")
    allow_pickle = bool(cfg.get("allow_pickle", False))
    base_ref, adapted_ref = required_ref(cfg, "base"), required_ref(cfg, "adapted")
    base_dir = resolve_model_dir(base_ref, allow_pickle=allow_pickle).resolve()
    adapted_dir = resolve_model_dir(adapted_ref, allow_pickle=allow_pickle).resolve()
    policy = _container(cfg.policy)
    merge_cfg = _container(cfg.merge)
    kernel, kernel_params = kernel_settings(merge_cfg)
    out_dir.mkdir(parents=True, exist_ok=True)

    adapted_ckpt = Checkpoint(adapted_dir)
    num_layers = layer_map_of_dir_config(adapted_ckpt.config).num_layers
    tmap, ranking_info, search = resolve_tmap(cfg, policy, base_dir, adapted_dir, out_dir, num_layers, kernel, kernel_params)
    log.info("merge: policy=%s kernel=%s mean t=%.3f layer t=%s", policy.get("name"), kernel, tmap.mean_t(num_layers),
             [round(tmap.layer_t.get(i, 0.0), 3) for i in range(num_layers)])  # fmt: skip

    result = merge_checkpoints(
        base_dir,
        adapted_dir,
        model_out,
        tmap,
        kernel=kernel,
        kernel_params=kernel_params,
        max_shard_size=merge_cfg.get("max_shard_size", "2GB"),
        overwrite=overwrite,
        check_values=bool(merge_cfg.get("check_values", True)),
        progress=bool(merge_cfg.get("progress", True)),
        threads=merge_cfg.get("threads", 1),
    )
    tmap_json = tmap.to_json()
    report: dict[str, Any] = {
        "policy": policy,
        "method": kernel,
        "kernel_params": kernel_params,
        "layer_t": result["layer_t"],
        "group_t": tmap_json["group_t"],
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
        "fallbacks": sum(1 for s in result["tensors"].values() if s.get("fallback")),
    }
    if search is not None:
        report["search"] = search
    report_path = write_json_atomic(out_dir / "merge_report.json", report)
    out_dtype = adapted_ckpt.dtype(adapted_ckpt.names[0]) if adapted_ckpt.names else "F32"
    mk = mergekit_config(
        tmap, base=str(base_dir), adapted=str(adapted_dir), num_layers=num_layers, kernel=kernel,
        kernel_params=kernel_params, out_dtype=out_dtype,
    )  # fmt: skip
    mk_path = write_mergekit_yaml(out_dir / "mergekit.yaml", mk, kernel=kernel, dot_threshold=kernel_params.get("dot_threshold"))
    log.info(
        "merge: wrote %s (%d tensors, %.1f MB) in %.1fs, peak RSS %.0f MB",
        model_out, len(result["tensors"]), result["bytes_written"] / 1e6, report["seconds"], report["peak_rss_bytes"] / 1e6,
    )  # fmt: skip

    tracker = start_tracker(cfg, "merge")
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
        "mergekit_path": str(mk_path),
        "policy": policy.get("name"),
        "method": kernel,
        "layer_t": report["layer_t"],
        "mean_t": report["mean_t"],
        "seconds": report["seconds"],
        "peak_rss_bytes": report["peak_rss_bytes"],
        "search": search,
    }


main = hydra_entry("merge", run)

if __name__ == "__main__":
    main()
