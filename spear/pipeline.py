"""``python -m spear.pipeline``: train -> analyze -> merge (policies + controls) -> evaluate -> summary.

Runs CPT under each seed of ``pipeline.seeds``, ranks the layers, maps the ranking to per-layer
``t`` by ``policy`` (and ``pipeline.extra_policies``), merges in memory and evaluates base, adapted,
every policy and its two controls (:mod:`spear.merging.controls`) with the ``eval`` suite and the
``proxy``, and writes ``summary.json``, ``summary.md`` and ``pareto.png`` (:mod:`spear.tracking.summary`).

One config for the whole loop (:class:`spear.config.stages.PipelineRun`): each stage gets its part
of it (:meth:`~spear.config.stages.PipelineRun.stage`). Each stage is keyed by the content hash of
its config and inputs (:mod:`spear.io.artifacts`) and stored under ``pipeline.cache_dir``, so a
sweep or a re-run never repeats an unchanged CPT, analysis or evaluation, and never reuses a damaged one (every
file of an entry is verified; ``pipeline.force`` recomputes on purpose).
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

from spear.cli import hydra_entry
from spear.errors import SpearError
from spear.merging.optimize import check_fit_kernel

log = logging.getLogger(__name__)

# What a stage's cache key leaves out: where it writes and logs, and what cannot change its result.
KEY_EXCLUDES = {"paths", "logger", "callbacks", "task_name", "run_name", "overwrite", "ckpt_path", "progress"}


def stage_key(stage_cfg, *inputs: Any) -> str:
    from spear.io.artifacts import content_key

    return content_key(stage_cfg.model_dump(mode="json", exclude=KEY_EXCLUDES), *inputs)


def forced_stages(force: list[str] | bool) -> frozenset[str]:
    """The cached stages ``pipeline.force`` names (``true``: all of them)."""
    from typing import get_args

    from spear.config.stages import CachedStage

    return frozenset(get_args(CachedStage) if force is True else force or ())


def command_started() -> float:
    """When this command started: a multirun's sweep start (Hydra's sweeper writes multirun.yaml first), else now.
    ``pipeline.force`` recomputes entries written before it, so the jobs of one sweep share what it recomputed."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    if HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN:
        marker = Path(HydraConfig.get().sweep.dir) / "multirun.yaml"
        if marker.exists():
            return marker.stat().st_mtime
    return time.time()


def check_single_process(trainer: dict[str, Any]) -> None:
    """The pipeline trains in its own process: a launcher that re-runs the command once per rank
    (Lightning's DDP) would re-run the whole pipeline, so multi-process CPT goes through spear.train."""
    devices, nodes = trainer.get("devices", 1), trainer.get("num_nodes", 1) or 1
    single = (devices == 1 or devices in ([0], ["0"])) and int(nodes) == 1
    if not single:
        raise SpearError(f"the pipeline trains in one process but trainer.devices={devices} (trainer.num_nodes={nodes}) "
                         "asks for several; run the CPT with `python -m spear.train trainer=...` and pass its model "
                         "as pipeline.adapted=<run dir>/model, or set trainer.devices=1")


def check_no_leak(data, proxy) -> None:
    """The CPT corpus shares no long paragraph with any proxy corpus (evaluated or calibration text):
    one line naming ``data.paths`` and the proxy key otherwise."""
    from spear.data.corpora import iter_documents, resolve_corpus
    from spear.data.overlap import check_disjoint
    from spear.evaluation.proxy import proxy_texts

    files = resolve_corpus(data.paths, data.format)
    trained = "\n".join(iter_documents(files, text_field=data.text_field, doc_separator=data.doc_separator))
    check_disjoint({"data.paths": trained}, proxy_texts(proxy))


class LazyMerger:
    """The adapted model with its in-memory merger, loaded on first use (never, when every evaluation is cached)."""

    def __init__(self, adapted_dir: str, base_dir: Path, merge, load) -> None:
        self.adapted_dir, self.base_dir, self.merge, self._load = adapted_dir, base_dir, merge, load
        self.model = self.tokenizer = self.merger = None
        self.load_seconds = 0.0

    def produce(self, tmap=None, merge=None):
        """(model, tokenizer, seconds spent preparing it) with ``tmap`` applied by ``merge`` (None: the
        session's kernel) or, without ``tmap``, the adapted model."""
        from spear.merging.inmemory import InMemoryMerger

        first = self.merger is None
        if first:
            self.model, self.tokenizer, self.load_seconds = self._load(self.adapted_dir)
            self.merger = InMemoryMerger(self.model, self.base_dir, self.merge)
        start = time.perf_counter()
        self.merger.reset() if tmap is None else self.merger.apply(tmap, merge=merge)
        seconds = time.perf_counter() - start + (self.load_seconds if first else 0.0)
        return self.model, self.tokenizer, seconds


class PipelineState:
    """State of one pipeline run: the config, cache, base model, policies and cost ledger."""

    def __init__(self, cfg) -> None:
        from spear.evaluation.harness import check_suite
        from spear.io.artifacts import StageCache, fingerprint_path
        from spear.merging.controls import Entry, entry_from_spec
        from spear.models import resolve_model_dir
        from spear.runtime import resolve_device

        self.cfg = cfg
        # every input is checked before the first expensive step
        self.entries = [Entry(cfg.policy), *(entry_from_spec(p) for p in cfg.pipeline.extra_policies)]
        labels = [e.label for e in self.entries]
        twice = sorted({label for label in labels if labels.count(label) > 1})
        if twice:
            raise SpearError(f"pipeline.extra_policies: two entries are both named {twice[0]!r}; give one a `label`")
        for entry in self.entries:
            if entry.policy.name == "optimized":
                check_fit_kernel(entry.merge or cfg.merge)
        check_suite(cfg.eval, cfg.proxy)
        if not cfg.pipeline.adapted or cfg.pipeline.freeze_compare.enabled:  # the pipeline runs a CPT
            check_single_process(cfg.trainer)
            check_no_leak(cfg.data, cfg.proxy)
        self.device = resolve_device(cfg.device)
        self.cache = StageCache(Path(cfg.pipeline.cache_dir).expanduser().resolve(),  # results hold its paths: absolute
                                force=forced_stages(cfg.pipeline.force), since=command_started())
        self.base_dir = resolve_model_dir(cfg.model.ref, allow_pickle=cfg.model.allow_pickle,
                                          allow_network=cfg.model.allow_network).resolve()
        self.base_fp = fingerprint_path(self.base_dir)
        self.cost: list[dict[str, Any]] = []
        self.train_seconds: list[float] = []
        self.policy_seconds: list[float] = []
        self.artifacts: dict[str, dict[str, str]] = {}  # seed -> paths of its stage outputs
        self.frontier: dict[str, list[dict[str, float]]] = {}  # seed -> the uniform sweep's points
        devices = cfg.trainer["devices"]
        self.ndev = devices if isinstance(devices, int) and devices > 0 else 1

    def account(self, stage: str, seconds: float, reused: bool) -> None:
        self.cost.append({"stage": stage, "seconds": round(seconds, 3), "device_hours": seconds * self.ndev / 3600,
                          "reused": reused})

    def load(self, ref: str):
        from spear.evaluation.stage import load_on_device

        start = time.perf_counter()
        model, tokenizer = load_on_device(ref, self.cfg.model, self.device)
        return model, tokenizer, time.perf_counter() - start

    # ------------------------------------------------------------------------------ stages
    def train(self, seed: int, label: str, freeze=None) -> dict[str, Any]:
        """CPT under ``seed`` (``freeze``: another mask than ``cfg.freeze``), or its cached result."""
        from spear.config.stages import TrainRun
        from spear.cpt.stage import run_train

        values = {"seed": seed, "overwrite": True, "task_name": "train"}
        if freeze is not None:
            values["freeze"] = freeze
        key = stage_key(self.cfg.stage(TrainRun, "", **values), self.base_fp)
        with self.cache.claim("train", key) as cached:
            if cached.result is None:
                start = time.perf_counter()
                summary = run_train(self.cfg.stage(TrainRun, str(cached.dir / "run"), **values))
                cached.complete({"key": key, "model_dir": summary["model_dir"], "seconds": time.perf_counter() - start,
                                "summary": summary})
        # later stages key on the trained weights themselves: a recomputed CPT that differs is analysed again
        hit = {**cached.result, "key": cached.digest(Path(cached.result["model_dir"]))}
        self.account(f"train {label}seed {seed}", hit["seconds"], self.cache.events[-1]["hit"])
        return hit

    def adapted_model(self, seed: int) -> dict[str, Any]:
        from spear.io.artifacts import fingerprint_path
        from spear.models import resolve_model_dir

        if self.cfg.pipeline.adapted:
            adapted_dir = resolve_model_dir(self.cfg.pipeline.adapted, allow_pickle=self.cfg.model.allow_pickle).resolve()
            self.account(f"train seed {seed} (given)", 0.0, True)
            return {"key": [str(adapted_dir), fingerprint_path(adapted_dir)], "model_dir": str(adapted_dir), "seconds": 0.0}
        adapted = self.train(seed, "")
        self.train_seconds.append(adapted["seconds"])
        return adapted

    def analyze(self, adapted: dict[str, Any], seed: int, impact=None) -> dict[str, Any]:
        """The ranking of the adapted model of ``seed`` by ``impact`` (None: the run's), or its cached result."""
        from spear.analysis.stage import run_analyze
        from spear.config.stages import AnalyzeRun

        values = {"base": str(self.base_dir), "adapted": adapted["model_dir"], "task_name": "analyze"}
        if impact is not None:
            values["impact"] = impact.model_dump()
        # the adapted model is keyed by adapted["key"] (a CPT's weights), not by the cache entry that holds it
        key = stage_key(self.cfg.stage(AnalyzeRun, "", **{**values, "adapted": "adapted"}), adapted["key"], self.base_fp)
        with self.cache.claim("analyze", key) as cached:
            if cached.result is None:
                out = cached.dir / "run"
                start = time.perf_counter()
                run_analyze(self.cfg.stage(AnalyzeRun, str(out), **values))
                cached.complete({"key": key, "ranking": str(out / "ranking.json"), "seconds": time.perf_counter() - start})
        hit = cached.result
        self.account(f"analyze {impact.name + ' ' if impact is not None else ''}seed {seed}", hit["seconds"],
                     self.cache.events[-1]["hit"])
        return hit

    def fit(self, adapted: dict[str, Any], seed: int, entry, label: str, session: LazyMerger) -> dict[str, Any]:
        """The fitted t map of an ``optimized`` entry on the adapted model of ``seed`` (cached)."""
        from spear.merging.optimize import fit_tmap

        policy, merge = entry.policy, entry.merge or self.cfg.merge
        key = stage_key(policy.replace(label=None), adapted["key"], self.base_fp, merge.model_dump(mode="json"),
                        self.cfg.proxy.model_dump(mode="json"), self.cfg.model.dtype)
        with self.cache.claim("fit", key) as cached:
            if cached.result is None:
                model, tokenizer, _ = session.produce()
                start = time.perf_counter()
                tmap, record = fit_tmap(model, tokenizer, self.base_dir, policy, self.cfg.proxy, merge,
                                        progress=self.cfg.progress)
                cached.complete({"key": key, "tmap": tmap.to_json(), "record": record, "seconds": time.perf_counter() - start})
        hit = cached.result
        self.account(f"fit {label} seed {seed}", hit["seconds"], self.cache.events[-1]["hit"])
        return hit

    def evaluate(self, key_parts: list[Any], name: str, produce, stage: str, with_prep: bool = False) -> dict[str, Any]:
        """Evaluation results for the model ``produce()`` returns, reused when ``key_parts`` match;
        its cost is accounted as ``stage`` (with the merge's preparation time when ``with_prep``)."""
        from spear.evaluation.harness import evaluate_model
        from spear.io.artifacts import content_key, fingerprint_path

        cfg = self.cfg
        files = [fingerprint_path(Path(c.path).expanduser()) for c in cfg.eval.own_benchmarks()]  # an edited benchmark is re-run
        key = content_key(cfg.eval.model_dump(mode="json"), cfg.proxy.model_dump(mode="json"), *key_parts,
                          *([files] if files else []))
        with self.cache.claim("evaluate", key) as cached:
            reused = cached.result is not None
            if cached.result is None:
                model, tokenizer, prep_seconds = produce()
                start = time.perf_counter()
                results = evaluate_model(model, tokenizer, cfg.eval, cfg.proxy, name, progress=cfg.progress)
                cached.complete({"results": results, "eval_seconds": time.perf_counter() - start,
                                "prep_seconds": prep_seconds})
        record = cached.result
        seconds = record["eval_seconds"] + (record["prep_seconds"] if with_prep else 0.0)
        self.account(stage, seconds, reused)
        return {**record, "seconds": seconds}

    # ------------------------------------------------------------------------------ models
    def run_seed(self, seed: int, base_results: dict[str, Any]) -> list[dict[str, Any]]:
        """Every model entry of one CPT seed: adapted, each policy and its controls."""
        from spear.analysis.ranking import Ranking
        from spear.config.schema import UniformPolicy
        from spear.evaluation.retention import retention_from_suite
        from spear.merging.controls import models_to_merge
        from spear.merging.plan import TMap
        from spear.tracking.frontier import add_frontier_advantage, add_score_advantage, sweep_points
        from spear.tracking.summary import model_entry

        cfg = self.cfg
        adapted = self.adapted_model(seed)
        analysis = self.analyze(adapted, seed)
        ranking = Ranking.load(analysis["ranking"])
        n = ranking.num_layers
        self.artifacts[str(seed)] = {"adapted_model": adapted["model_dir"], "ranking": analysis["ranking"],
                                     "analysis_dir": str(Path(analysis["ranking"]).parent)}
        rankings = {}  # entries with their own impact: one more analysis each (cached by its config)
        for compared in self.entries:
            if compared.impact is not None:
                own = self.analyze(adapted, seed, compared.impact)["ranking"]
                rankings[compared.label] = Ranking.load(own)
                self.artifacts[str(seed)].setdefault("rankings", {})[compared.label] = own
        session = LazyMerger(adapted["model_dir"], self.base_dir, cfg.merge, self.load)
        adapted_results = self.evaluate([adapted["key"]], "adapted", session.produce, f"evaluate adapted seed {seed}")["results"]

        def entry(name: str, kind: str, results: dict[str, Any], **extra: Any) -> dict[str, Any]:
            retention = retention_from_suite(results, base_results, adapted_results, cfg.eval, cfg.proxy)
            return model_entry(name, kind, results, retention, seed, **extra)

        entries = [entry("base", "baseline", base_results, mean_t=1.0), entry("adapted", "baseline", adapted_results, mean_t=0.0)]
        if cfg.pipeline.freeze_compare.enabled:
            entries.append(self.frozen_cpt_entry(seed, analysis["ranking"], entry))
        fits = {}
        for compared in self.entries:
            if compared.policy.name == "optimized":
                fits[compared.label] = self.fit(adapted, seed, compared, compared.label, session)
        fitted = {label: TMap.from_json(fit["tmap"]) for label, fit in fits.items()}
        merge_key = cfg.merge.model_dump(mode="json")
        results_by_t = {0.0: adapted_results, 1.0: base_results}  # t=0 is the adapted model, t=1 the base, bit for bit
        for t in sorted(set(cfg.pipeline.frontier.ts) - {0.0, 1.0}):
            tmap, name = TMap.everywhere(n, t), f"uniform_t{t:g}"
            record = self.evaluate([adapted["key"], self.base_fp, merge_key, tmap.to_json()], name,
                                   lambda tmap=tmap: session.produce(tmap), f"merge+evaluate {name} seed {seed}", with_prep=True)
            results_by_t[t] = record["results"]
            entries.append(entry(name, "frontier", record["results"], mean_t=t, tmap=tmap.to_json(),
                                 policy=UniformPolicy(t=t, non_layer_t=t).model_dump()))
        for item in models_to_merge(ranking, self.entries, n, controls=cfg.pipeline.controls,
                                    random_seed=cfg.pipeline.random_seed, fitted=fitted, rankings=rankings):
            item_merge = item.merge.model_dump(mode="json") if item.merge is not None else merge_key
            record = self.evaluate([adapted["key"], self.base_fp, item_merge, item.tmap.to_json()], item.name,
                                   lambda item=item: session.produce(item.tmap, item.merge),
                                   f"merge+evaluate {item.name} seed {seed}", with_prep=True)
            extra: dict[str, Any] = {"control_of": item.control_of} if item.control_of else {}
            if item.merge is not None:
                extra["merge"] = item_merge
            fit = fits.get(item.name) if item.kind == "policy" else None
            if fit is not None:
                extra["fit"] = {k: fit["record"][k] for k in ("seconds", "before", "after", "calibration", "units", "t")}
            if item.kind == "policy":
                self.policy_seconds.append(record["seconds"] + (fit["seconds"] if fit is not None else 0.0))
            entries.append(entry(item.name, item.kind, record["results"], mean_t=item.tmap.mean_t(n),
                                 tmap=item.tmap.to_json(), policy=item.policy.model_dump(), **extra))
        entries = unique_names(entries)
        if cfg.pipeline.frontier.ts:
            sweep = {t: results_by_t[t] for t in cfg.pipeline.frontier.ts}
            self.frontier[str(seed)] = sweep_points(sweep, cfg.proxy.general.name, cfg.proxy.domain.name)
            add_frontier_advantage(entries, self.frontier[str(seed)], cfg.proxy.general.name, cfg.proxy.domain.name)
            add_score_advantage(entries, sweep, {"general": cfg.eval.general_tasks, "domain": cfg.eval.domain_tasks},
                                cfg.proxy.general.name, cfg.proxy.domain.name)
        return entries

    def frozen_cpt_entry(self, seed: int, ranking_path: str, entry) -> dict[str, Any]:
        """CPT again with the ranking's top-k layers frozen: the a-priori twin of restoring them (t=1)."""
        k = self.cfg.pipeline.freeze_compare.k
        freeze = self.cfg.freeze.replace(mode="ranked", ranking=ranking_path, k=k)
        frozen = self.train(seed, f"freeze_top{k} ", freeze=freeze.model_dump())
        name = f"freeze_top{k}"
        record = self.evaluate([frozen["key"]], name, lambda: self.load(frozen["model_dir"]), f"evaluate {name} seed {seed}")
        return entry(name, "freeze", record["results"], mean_t=None, cost_seconds=frozen["seconds"] + record["eval_seconds"])

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


def unique_names(entries: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One entry per model, one model per name: a repeat of the same merge (same t map and kernel) is dropped,
    a different model under a taken name (``policy=uniform policy.t=0.5`` beside the frontier's t=0.5 point,
    which also moves the embeddings) is renamed ``<name> [<kind>]``, so seeds never pool two models."""
    seen: dict[str, dict[str, Any]] = {}
    out = []
    for entry in entries:
        name = entry["name"]
        earlier = seen.get(name)
        if earlier is not None and (earlier.get("tmap"), earlier.get("merge")) == (entry.get("tmap"), entry.get("merge")):
            log.info("pipeline: %s (%s) is the same model as the %s entry; evaluated once", name, entry["kind"], earlier["kind"])
            continue
        if earlier is not None:
            entry = {**entry, "name": f"{name} [{entry['kind']}]"}
            log.warning("pipeline: two different models are named %s; the %s one is recorded as %r (set its label to "
                        "name it)", name, entry["kind"], entry["name"])
            if entry["name"] in seen:
                raise SpearError(f"pipeline: the model name {entry['name']!r} is taken twice; give the policies distinct labels")
        seen[entry["name"]] = entry
        out.append(entry)
    return out


def run_pipeline(cfg) -> dict[str, Any]:
    from spear.config import save_run_config
    from spear.tracking import start_tracker
    from spear.tracking.summary import aggregate_seeds, relations_of, write_summary

    started = time.perf_counter()
    out_dir = Path(cfg.paths.output_dir)
    state = PipelineState(cfg)
    base_results = state.evaluate([state.base_fp], "base", lambda: state.load(str(state.base_dir)), "evaluate base")["results"]
    per_seed = [state.run_seed(seed, base_results) for seed in cfg.pipeline.seeds]
    entries = aggregate_seeds(per_seed)
    summary = {
        "seeds": list(cfg.pipeline.seeds),
        "models": entries,
        "relations": relations_of(entries),
        "per_seed": per_seed,
        "cost": state.cost_summary(time.perf_counter() - started),
        "cache": state.cache.events,
        "artifacts": state.artifacts,
        "frontier": {"ts": list(cfg.pipeline.frontier.ts), "general": cfg.proxy.general.name,
                     "domain": cfg.proxy.domain.name, "per_seed": state.frontier},
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    save_run_config(cfg, out_dir)
    print(write_summary(out_dir, summary))  # plain Markdown: wide tables stay readable in logs
    tracker = start_tracker(cfg)
    try:
        tracker.log_table("summary", [{"name": e["name"], **e["metrics"]} for e in entries])
        tracker.log_image("pareto", out_dir / "pareto.png")
    finally:
        tracker.finish()
    return summary


main = hydra_entry("pipeline", "spear.pipeline:run_pipeline")

if __name__ == "__main__":
    main()
