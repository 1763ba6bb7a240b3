"""The SPEAR-MM loop: train -> analyze -> merge (policies + controls) -> evaluate -> summary.

``python -m spear.pipeline`` runs CPT under each seed of ``pipeline.seeds``, ranks the layers,
maps the ranking to per-layer ``t`` by ``policy`` (and ``pipeline.extra_policies``), merges in
memory and evaluates base, adapted, every policy and two controls per policy (``uniform`` at
the same mean ``t``, and the same policy on a random ranking) with the ``eval`` suite. It writes
``summary.json``, ``summary.md`` and ``pareto.png``.

Each stage is keyed by the content hash of its resolved config and inputs (``spear.io.artifacts``)
and stored under ``pipeline.cache_dir``, so a sweep over policies or a re-run never repeats CPT,
analysis or an evaluation whose inputs are unchanged.
"""

from __future__ import annotations

import json
import logging
import random
import time
from pathlib import Path
from typing import Any

from spear.cli import hydra_entry
from spear.errors import SpearError

log = logging.getLogger(__name__)

# Top-level nodes of the pipeline config forwarded, whole, into each stage's config.
FORWARD = {
    "train": ("model", "data", "trainer", "freeze", "logger"),
    "analyze": ("impact", "logger"),
}


# ----------------------------------------------------------------------------- configs


def compose_stage(name: str):
    """The default config of stage ``name`` (Hydra compose, inside or outside a Hydra app)."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from spear.paths import CONF_DIR

    if GlobalHydra.instance().is_initialized():
        return compose(config_name=name)
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose(config_name=name)


def stage_config(cfg, stage: str, output_dir: Path, **values: Any):
    """``stage``'s config: its defaults, the pipeline's shared groups, ``stages.<stage>``, ``values``."""
    from omegaconf import OmegaConf

    stage_cfg = compose_stage(stage)
    OmegaConf.set_struct(stage_cfg, False)
    for key in FORWARD.get(stage, ()):
        stage_cfg[key] = OmegaConf.to_container(cfg[key], resolve=False)
    stage_cfg.paths.cache_dir = cfg.paths.cache_dir
    stage_cfg.paths.output_dir = str(output_dir)
    overrides = (cfg.get("stages") or {}).get(stage) or {}
    stage_cfg = OmegaConf.merge(stage_cfg, OmegaConf.to_container(overrides, resolve=False))
    for key, value in values.items():
        OmegaConf.update(stage_cfg, key, value, force_add=True)
    return stage_cfg


def stage_key(stage_cfg, *inputs: Any) -> str:
    """Content key of a stage: its resolved config (without where it writes or logs) + inputs."""
    from omegaconf import OmegaConf

    from spear.io.artifacts import content_key

    resolved = OmegaConf.to_container(stage_cfg, resolve=True)
    for volatile in ("paths", "logger", "task_name", "hydra"):
        resolved.pop(volatile, None)
    return content_key(resolved, *inputs)


# ------------------------------------------------------------------------------ stages


def run_train(cfg, cache, base_fp, seed: int, **values: Any) -> dict[str, Any]:
    """CPT under ``seed`` (``values``: extra dotted train keys, e.g. a freeze mask), or its cached result."""
    from spear import train

    probe = stage_config(cfg, "train", Path("/dev/null"), seed=seed, **values)
    key = stage_key(probe, base_fp)
    hit = cache.lookup("train", key)
    if hit is not None:
        log.info("pipeline: CPT seed %d reused (%s)", seed, key)
        return hit
    out = cache.dir_for("train", key) / "run"
    stage_cfg = stage_config(cfg, "train", out, seed=seed, overwrite=True, **values)
    start = time.perf_counter()
    summary = train.run(stage_cfg)
    result = {"key": key, "model_dir": summary["model_dir"], "seconds": time.perf_counter() - start, "summary": summary}
    return cache.complete("train", key, result)


def run_analyze(cfg, cache, base_dir: Path, adapted: dict[str, Any]) -> dict[str, Any]:
    from spear import analyze
    from spear.io.artifacts import fingerprint_path

    values = {"base": str(base_dir), "adapted": adapted["model_dir"], "seed": int(cfg.seed)}
    probe = stage_config(cfg, "analyze", Path("/dev/null"), **values)
    key = stage_key(probe, adapted["key"], fingerprint_path(base_dir))
    hit = cache.lookup("analyze", key)
    if hit is not None:
        return hit
    out = cache.dir_for("analyze", key) / "run"
    start = time.perf_counter()
    analyze.run(stage_config(cfg, "analyze", out, **values))
    result = {"key": key, "ranking": str(out / "ranking.json"), "seconds": time.perf_counter() - start}
    return cache.complete("analyze", key, result)


def evaluate_cached(cache, eval_cfg, key_parts: list[Any], name: str, produce) -> dict[str, Any]:
    """Evaluation results for a model ``produce()`` returns, reused when ``key_parts`` match."""
    from omegaconf import OmegaConf

    from spear.evaluation.harness import evaluate_model
    from spear.io.artifacts import content_key

    key = content_key(OmegaConf.to_container(eval_cfg, resolve=True), *key_parts)
    hit = cache.lookup("evaluate", key)
    if hit is not None:
        return {**hit, "reused": True}
    model, tokenizer, prep_seconds = produce()
    start = time.perf_counter()
    results = evaluate_model(model, tokenizer, eval_cfg, name)
    record = {"results": results, "eval_seconds": time.perf_counter() - start, "prep_seconds": prep_seconds}
    return {**cache.complete("evaluate", key, record), "reused": False}


# ------------------------------------------------------------------------ rankings/t maps


def random_ranking(ranking: dict[str, Any], seed: int) -> dict[str, Any]:
    """The control ranking: the same scores, given to layers in a seeded random order.

    Each layer's entry (score and per-group scores) moves to a random other layer, so a policy
    produces the same multiset of ``t`` values, placed without regard to the analysis.
    """
    layers = [int(e["layer"]) for e in ranking["layers"]]
    target = list(layers)
    random.Random(seed).shuffle(target)
    moved = dict(zip(layers, target, strict=True))
    entries = [{**e, "layer": moved[int(e["layer"])]} for e in ranking["layers"]]
    return {
        "num_layers": ranking["num_layers"],
        "order": [moved[int(layer)] for layer in ranking["order"]],
        "layers": sorted(entries, key=lambda e: e["layer"]),
        "impact": {"name": "random_permutation", "params": {"seed": seed, "of": ranking.get("impact")}},
    }


def _load_policy(name: str) -> dict[str, Any]:
    from omegaconf import OmegaConf

    from spear.paths import CONF_DIR

    path = CONF_DIR / "policy" / f"{name}.yaml"
    if not path.exists():
        known = sorted(p.stem for p in (CONF_DIR / "policy").glob("*.yaml"))
        raise SpearError(f"pipeline policy {name!r} is unknown; use one of {', '.join(known)}")
    return OmegaConf.to_container(OmegaConf.load(path), resolve=True)


def policy_config(spec: Any) -> dict[str, Any]:
    """An extra policy: a ``conf/policy/<name>.yaml`` name, or ``{policy: name, label: ..., **overrides}``."""
    from omegaconf import DictConfig, OmegaConf

    if isinstance(spec, str):
        return _load_policy(spec)
    node = OmegaConf.to_container(spec, resolve=True) if isinstance(spec, DictConfig) else dict(spec)
    if "policy" not in node:
        raise SpearError(f"pipeline.extra_policies entry {node} needs `policy: <name of conf/policy/*.yaml>`")
    return {**_load_policy(str(node.pop("policy"))), **node}


def policy_label(policy: dict[str, Any]) -> str:
    if policy.get("label"):
        return str(policy["label"])
    label = str(policy["name"])
    if label in ("uniform", "layers", "top_k") and policy.get("t") is not None:
        label += f"_t{policy['t']}"
    if policy.get("granularity", "layer") != "layer":
        label += f"_{policy['granularity']}"
    return label


def merge_plan(cfg, ranking: dict[str, Any], num_layers: int) -> list[dict[str, Any]]:
    """The (label, kind, TMap) of every merged model to evaluate for one seed."""
    from omegaconf import OmegaConf

    from spear.merging.policies import TMap, build_tmap, parse_ranking

    parsed = parse_ranking(ranking)
    primary = OmegaConf.to_container(cfg.policy, resolve=True)
    policies = [primary] + [policy_config(p) for p in cfg.pipeline.get("extra_policies") or []]
    plan: list[dict[str, Any]] = []
    for policy in policies:
        if policy.get("name") == "target_retention":
            raise SpearError("policy=target_retention searches with its own evaluation; run it with `python -m spear.merge`")
        label = policy_label(policy)
        tmap = build_tmap(parsed, policy, num_layers)
        plan.append({"name": label, "kind": "policy", "policy": policy, "tmap": tmap})
        if not cfg.pipeline.get("controls", True) or policy["name"] == "uniform":
            continue
        mean_t = tmap.mean_t(num_layers)
        uniform = {"name": "uniform", "t": round(mean_t, 6), "non_layer_t": policy.get("non_layer_t", 0.0)}
        plan.append({
            "name": f"uniform@{label}", "kind": "control", "control_of": label, "policy": uniform,
            "tmap": TMap(dict.fromkeys(range(num_layers), mean_t), None, tmap.non_layer_t),
        })
        shuffled = parse_ranking(random_ranking(ranking, int(cfg.pipeline.random_seed)))
        plan.append({
            "name": f"{label}@random", "kind": "control", "control_of": label, "policy": policy,
            "tmap": build_tmap(shuffled, policy, num_layers),
        })
    return plan


# ----------------------------------------------------------------------------- summary


def _binomial_se(p: float | None, n: int | None) -> float | None:
    if p is None or not n or not 0 <= p <= 1:
        return None
    return (p * (1 - p) / n) ** 0.5


def model_entry(name: str, kind: str, results: dict[str, Any], retention: dict[str, Any] | None,
                seed: int, **extra: Any) -> dict[str, Any]:
    """One row of ``summary.json``: the raw metrics, retention, domain-gain preservation."""
    metrics: dict[str, Any] = {}
    for task, values in results.get("tasks", {}).items():
        metric = results.get("primary_metric", {}).get(task)
        if metric is None or values.get(metric) is None:
            continue
        metrics[f"{task}/{metric}"] = values[metric]
        n = results.get("n_samples", {}).get(task)
        se = values.get(f"{metric}_stderr")
        if se is None and metric.startswith("acc"):
            se = _binomial_se(values[metric], n if isinstance(n, int) else None)
        if se is not None:
            metrics[f"{task}/{metric}_stderr"] = se
    for corpus, ppl in results.get("perplexity", {}).items():
        metrics[f"ppl/{corpus}"] = ppl
        metrics[f"nll/{corpus}"] = results.get("nll", {}).get(corpus)
    metrics["mean_t"] = extra.get("mean_t")
    if retention is not None:
        metrics["general_retention"] = retention.get("general_retention")
        metrics["domain_gain_preservation"] = retention.get("domain_gain_preservation")
    return {"name": name, "kind": kind, "seed": seed, "metrics": metrics, **extra}


def relations_of(entries: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """For every policy: its Pareto relation to each of its controls and to the adapted model."""
    from spear.tracking.summary import relation

    by_name = {e["name"]: e for e in entries}
    out = []
    for e in entries:
        if e["kind"] != "policy":
            continue
        for other in [c for c in entries if c.get("control_of") == e["name"]] + [by_name.get("adapted")]:
            if other is not None:
                out.append({"policy": e["name"], "versus": other["name"], "relation": relation(e, other)})
    return out


def write_summary(out_dir: Path, summary: dict[str, Any]) -> str:
    from spear.io.atomic import write_json_atomic, write_text_atomic
    from spear.tracking.summary import markdown_table, pareto_plot

    entries = summary["models"]
    raw_cols = sorted({k for e in entries for k in e["metrics"]} - {"general_retention", "domain_gain_preservation", "mean_t"})
    raw_cols = [c for c in raw_cols if not c.endswith("_stderr")]
    columns = ["general_retention", "domain_gain_preservation", "mean_t", *raw_cols]
    seeds = summary["seeds"]
    lines = [
        "# SPEAR-MM pipeline summary",
        "",
        f"Seeds: {seeds} ({len(seeds)} CPT run(s)); values are means"
        + (" ± half-width of the 95% t-interval over seeds." if len(seeds) > 1 else "."),
        "general_retention: mean over general entries of score(model)/score(base) (NLL: nll(base)/nll(model)); "
        "domain_gain_preservation: (dom(model)-dom(base))/(dom(adapted)-dom(base)).",
        "",
        markdown_table(entries, columns),
        "",
        "## Policy vs controls (Pareto on general retention, domain-gain preservation)",
        "",
        "| policy | versus | relation |",
        "|---|---|---|",
        *[f"| {r['policy']} | {r['versus']} | {r['relation']} |" for r in summary["relations"]],
        "",
        "## Cost",
        "",
        "| stage | seconds | device-hours | reused |",
        "|---|---|---|---|",
        *[f"| {c['stage']} | {c['seconds']:.1f} | {c['device_hours']:.4f} | {c['reused']} |" for c in summary["cost"]["stages"]],
        "",
        f"One extra policy configuration (in-memory merge + evaluation) costs "
        f"{summary['cost']['extra_policy_vs_cpt']:.3f}× one CPT run." if summary["cost"].get("extra_policy_vs_cpt") else "",
    ]
    text = "\n".join(lines) + "\n"
    write_json_atomic(out_dir / "summary.json", summary)
    write_text_atomic(out_dir / "summary.md", text)
    pareto_plot(entries, out_dir / "pareto.png")
    return text


# ---------------------------------------------------------------------------------- run


def _device(cfg) -> str:
    import torch

    want = str(cfg.pipeline.get("device", "auto"))
    return ("cuda" if torch.cuda.is_available() else "cpu") if want == "auto" else want


def _devices_count(cfg) -> int:
    devices = cfg.trainer.get("devices", 1)
    return devices if isinstance(devices, int) and devices > 0 else 1


class LazyMerger:
    """The adapted model with its in-memory merger, loaded on first use.

    When every evaluation of a seed is cached, the adapted model is never loaded at all.
    """

    def __init__(self, adapted_dir: str, base_dir: Path, merge_cfg: dict[str, Any], load) -> None:
        self.adapted_dir, self.base_dir, self.merge_cfg, self._load = adapted_dir, base_dir, merge_cfg, load
        self.model = self.tokenizer = self.merger = None
        self.load_seconds = 0.0

    def produce(self, tmap=None):
        """(model, tokenizer, seconds spent preparing it) with ``tmap`` applied (None: adapted)."""
        from spear.merge import kernel_settings
        from spear.merging.inmemory import InMemoryMerger

        first = self.merger is None
        if first:
            self.model, self.tokenizer, self.load_seconds = self._load(self.adapted_dir)
            kernel, params = kernel_settings(self.merge_cfg)
            self.merger = InMemoryMerger(self.model, self.base_dir, kernel, params)
        start = time.perf_counter()
        self.merger.reset() if tmap is None else self.merger.apply(tmap)
        seconds = time.perf_counter() - start + (self.load_seconds if first else 0.0)
        return self.model, self.tokenizer, seconds


class PipelineRun:
    """State of one pipeline run: cache, base model, evaluation suite and cost ledger."""

    def __init__(self, cfg) -> None:
        from omegaconf import OmegaConf

        from spear.io.artifacts import StageCache, fingerprint_path
        from spear.models import resolve_model_dir

        self.cfg = cfg
        self.cache = StageCache(Path(cfg.pipeline.cache_dir))
        self.device = _device(cfg)
        self.model_kwargs = {k: cfg.model.get(k) for k in ("dtype", "allow_pickle", "trust_remote_code", "allow_network")}
        self.base_dir = resolve_model_dir(
            cfg.model.ref, allow_pickle=bool(cfg.model.allow_pickle), allow_network=bool(cfg.model.allow_network)
        ).resolve()
        self.base_fp = fingerprint_path(self.base_dir)
        self.eval_cfg = cfg.eval
        self.merge_cfg = OmegaConf.to_container(cfg.merge, resolve=True)
        self.cost: list[dict[str, Any]] = []
        self.train_seconds: list[float] = []
        self.policy_seconds: list[float] = []
        self.artifacts: dict[str, dict[str, str]] = {}  # seed -> paths of its stage outputs
        self.ndev = _devices_count(cfg)

    def account(self, stage: str, seconds: float, reused: bool) -> None:
        self.cost.append({"stage": stage, "seconds": round(seconds, 3), "device_hours": seconds * self.ndev / 3600,
                          "reused": reused})

    def load(self, ref: str):
        from spear.models import load_model

        start = time.perf_counter()
        model, tokenizer = load_model(ref, **self.model_kwargs)
        return model.to(self.device), tokenizer, time.perf_counter() - start

    def adapted_model(self, seed: int) -> dict[str, Any]:
        from spear.io.artifacts import fingerprint_path
        from spear.models import resolve_model_dir

        if self.cfg.pipeline.get("adapted"):
            adapted_dir = resolve_model_dir(self.cfg.pipeline.adapted).resolve()
            self.account(f"train seed {seed} (given)", 0.0, True)
            return {"key": fingerprint_path(adapted_dir), "model_dir": str(adapted_dir), "seconds": 0.0}
        mark = len(self.cache.events)
        adapted = run_train(self.cfg, self.cache, self.base_fp, seed)
        self.account(f"train seed {seed}", adapted["seconds"], self.cache.events[mark]["hit"])
        self.train_seconds.append(adapted["seconds"])
        return adapted

    def evaluate_base(self) -> dict[str, Any]:
        record = evaluate_cached(self.cache, self.eval_cfg, [self.base_fp], "base", lambda: self.load(str(self.base_dir)))
        self.account("evaluate base", record["eval_seconds"], record["reused"])
        return record["results"]

    def run_seed(self, seed: int, base_results: dict[str, Any]) -> list[dict[str, Any]]:
        """Every model entry of one CPT seed: adapted, each policy and its controls."""
        from spear.evaluation.retention import retention_from_suite

        adapted = self.adapted_model(seed)
        mark = len(self.cache.events)
        analysis = run_analyze(self.cfg, self.cache, self.base_dir, adapted)
        self.account(f"analyze seed {seed}", analysis["seconds"], self.cache.events[mark]["hit"])
        ranking = json.loads(Path(analysis["ranking"]).read_text())
        num_layers = int(ranking["num_layers"])
        self.artifacts[str(seed)] = {"adapted_model": adapted["model_dir"], "ranking": analysis["ranking"],
                                     "analysis_dir": str(Path(analysis["ranking"]).parent)}
        session = LazyMerger(adapted["model_dir"], self.base_dir, self.merge_cfg, self.load)

        record = evaluate_cached(self.cache, self.eval_cfg, [adapted["key"]], "adapted", session.produce)
        self.account(f"evaluate adapted seed {seed}", record["eval_seconds"], record["reused"])
        adapted_results = record["results"]

        def retention(results: dict[str, Any]) -> dict[str, Any]:
            return retention_from_suite(results, base_results, adapted_results, self.eval_cfg)

        entries = [
            model_entry("base", "baseline", base_results, retention(base_results), seed, mean_t=1.0),
            model_entry("adapted", "baseline", adapted_results, retention(adapted_results), seed, mean_t=0.0),
        ]
        frozen = self.cfg.pipeline.get("freeze_compare") or {}
        if frozen.get("enabled"):
            entries.append(self.frozen_cpt_entry(seed, analysis["ranking"], int(frozen.get("k", 8)), retention))
        for item in merge_plan(self.cfg, ranking, num_layers):
            tmap = item["tmap"]
            key = [adapted["key"], self.base_fp, self.merge_cfg, tmap.to_json()]
            record = evaluate_cached(self.cache, self.eval_cfg, key, item["name"], lambda tmap=tmap: session.produce(tmap))
            seconds = record["eval_seconds"] + record["prep_seconds"]
            self.account(f"merge+evaluate {item['name']} seed {seed}", seconds, record["reused"])
            if item["kind"] == "policy":
                self.policy_seconds.append(seconds)
            extra = {"control_of": item["control_of"]} if "control_of" in item else {}
            entries.append(model_entry(
                item["name"], item["kind"], record["results"], retention(record["results"]), seed,
                mean_t=tmap.mean_t(num_layers), tmap=tmap.to_json(), policy=item["policy"], **extra,
            ))
        return entries

    def frozen_cpt_entry(self, seed: int, ranking_path: str, k: int, retention) -> dict[str, Any]:
        """CPT again with the ranking's top-k layers frozen: the a-priori twin of restoring them (t=1)."""
        mark = len(self.cache.events)
        values = {"freeze.mode": "ranked", "freeze.ranking": ranking_path, "freeze.k": k}
        frozen = run_train(self.cfg, self.cache, self.base_fp, seed, **values)
        self.account(f"train freeze_top{k} seed {seed}", frozen["seconds"], self.cache.events[mark]["hit"])
        name = f"freeze_top{k}"
        record = evaluate_cached(self.cache, self.eval_cfg, [frozen["key"]], name, lambda: self.load(frozen["model_dir"]))
        self.account(f"evaluate {name} seed {seed}", record["eval_seconds"], record["reused"])
        return model_entry(name, "freeze", record["results"], retention(record["results"]), seed,
                           mean_t=None, cost_seconds=frozen["seconds"] + record["eval_seconds"])

    def cost_summary(self, wall_seconds: float) -> dict[str, Any]:
        def mean(xs: list[float]) -> float | None:
            return sum(xs) / len(xs) if xs else None

        cpt, extra = mean(self.train_seconds), mean(self.policy_seconds)
        return {
            "stages": self.cost,
            "cpt_seconds": cpt,
            "extra_policy_seconds": extra,
            "extra_policy_vs_cpt": extra / cpt if cpt and extra is not None else None,
            "wall_seconds": wall_seconds,
        }


def run(cfg) -> dict[str, Any]:
    from spear.tracking import start_tracker
    from spear.tracking.summary import aggregate_seeds

    started = time.perf_counter()
    out_dir = Path(cfg.paths.output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    seeds = [int(s) for s in (cfg.pipeline.get("seeds") or [cfg.seed])]
    state = PipelineRun(cfg)
    base_results = state.evaluate_base()
    per_seed = [state.run_seed(seed, base_results) for seed in seeds]
    entries = aggregate_seeds(per_seed)
    summary = {
        "seeds": seeds,
        "models": entries,
        "relations": relations_of(entries),
        "per_seed": per_seed,
        "cost": state.cost_summary(time.perf_counter() - started),
        "cache": state.cache.events,
        "artifacts": state.artifacts,
    }
    print(write_summary(out_dir, summary))  # plain Markdown: wide tables stay readable in logs
    tracker = start_tracker(cfg, "pipeline")
    try:
        tracker.log_table("summary", [{"name": e["name"], **e["metrics"]} for e in entries])
        tracker.log_image("pareto", out_dir / "pareto.png")
    finally:
        tracker.finish()
    return summary


main = hydra_entry("pipeline", run)

if __name__ == "__main__":
    main()
