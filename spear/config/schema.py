"""The typed configuration of every stage: one home for each knob's default, type, range and help.

Each config group is a pydantic model; a group's options (``policy=balanced``, ``merge=linear``, ...)
are instances of it that change only what differs from the class defaults (:data:`GROUP_OPTIONS`).
:mod:`spear.config.store` registers them in Hydra's ConfigStore as plain nodes, so Hydra composes and
overrides them (``policy.k=4``) without checking types; :func:`spear.config.store.validate` then checks
the whole composed config once, against the stage's root model (:mod:`spear.config.stages`), and turns
the first problem into one ``error: <key>=...; <fix>`` line. Groups that are other libraries' constructor
arguments (``trainer``, ``logger``, ``callbacks``, ``hydra``) stay YAML files under ``conf/``.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, model_validator

Fraction = Annotated[float, Field(ge=0.0, le=1.0)]
Strength = Annotated[float, Field(ge=0.0, le=1.0, description="restoration strength: 0 keeps the adapted tensor, 1 returns the base")]
Granularity = Literal["layer", "module"]
MISSING = "???"
NEWS_ARTICLE_SEPARATOR = r"\n{3,}"  # articles of the embedded news corpora are separated by two blank lines


def knob(default: Any, help: str, **constraints: Any) -> Any:
    """A field with its default, its one-line help (the config table's text) and its constraints."""
    return Field(default, description=help, **constraints)


class Node(BaseModel):
    """A config node: unknown keys are errors, values are checked on construction, nodes are immutable."""

    model_config = ConfigDict(extra="forbid", frozen=True, validate_default=False)

    def replace(self, **changes: Any):
        """A validated copy with ``changes`` (pydantic's ``model_copy`` does not validate)."""
        return type(self).model_validate({**self.model_dump(), **changes})


# ------------------------------------------------------------------------------------ paths, model


class PathsConfig(Node):
    cache_dir: str = knob("${oc.env:SPEAR_HOME,${oc.env:HOME}/.cache/spear}", "asset, model and token cache ($SPEAR_HOME)")
    log_dir: str = knob("runs", "where run dirs are created (runs/<stage>/<timestamp>)")
    output_dir: str = knob("${hydra:runtime.output_dir}", "this run's dir (set it with hydra.run.dir=...)")


class ModelConfig(Node):
    ref: str = knob("smollm2_135m", "alias (smollm2_135m, tiny_llama, tiny_gemma), local HF dir, .gguf file or hub id")
    dtype: Literal["float32", "bfloat16", "float16", "auto"] = knob("float32", "dtype the model is loaded in")
    allow_pickle: bool = knob(False, "accept .bin/.pt weights (pickle can run code when loaded)")
    trust_remote_code: bool = knob(False, "run the model repo's own Python code")
    allow_network: bool = knob(False, "allow hub downloads (also needs HF_HUB_OFFLINE=0)")

    def load_options(self) -> dict[str, Any]:
        """The keyword arguments of :func:`spear.models.load_model` besides the reference."""
        return self.model_dump(exclude={"ref"})


# ------------------------------------------------------------------------------------------- data


class DataConfig(Node):
    paths: list[str] = knob(MISSING, "CPT corpus: files, globs, dirs or asset:<name>")
    format: Literal["auto", "text", "jsonl"] = knob("auto", "auto: .jsonl/.json/.ndjson are JSONL, the rest text")
    text_field: str = knob("text", "JSONL field holding a document's text")
    doc_separator: str | None = knob(None, "regex splitting a text file into documents (null: one file = one document)")
    add_eos: bool = knob(True, "EOS token after every document in the packed stream")
    block_size: int = knob(256, "tokens per packed training sequence", ge=2)
    batch_size: int = knob(4, "sequences per device per step", ge=1)
    eval_batch_size: int | None = knob(None, "validation batch size (null: batch_size)", ge=1)
    val_fraction: float = knob(0.05, "share of blocks held out for validation (0: none)", ge=0.0, lt=1.0)
    split_seed: int = knob(1234, "seed of the block-level train/validation split")
    shuffle: bool = knob(True, "reshuffle training blocks every epoch (seeded by seed and epoch)")
    num_workers: int = knob(0, "DataLoader workers (blocks are memory-mapped: 0 is fine on CPU)", ge=0)
    cache: bool = knob(True, "cache the token stream, keyed by tokenizer + corpus hash")
    cache_dir: str = knob("${paths.cache_dir}/tokens", "where cached token arrays live")


# ------------------------------------------------------------------------------------------ train


class OptimConfig(Node):
    lr: float = knob(1.5e-4, "peak AdamW learning rate (the CPU news recipe: experiments/recipe_search)", gt=0.0)
    weight_decay: float = knob(0.01, "AdamW weight decay on matrices (none on biases and norms)", ge=0.0)
    betas: tuple[Annotated[float, Field(ge=0.0, lt=1.0)], Annotated[float, Field(ge=0.0, lt=1.0)]] = knob(
        (0.9, 0.95), "AdamW betas"
    )
    eps: float = knob(1.0e-8, "AdamW epsilon", gt=0.0)
    warmup_steps: int = knob(3, "linear warmup steps, then cosine decay", ge=0)
    min_lr_ratio: Fraction = knob(0.0, "final LR = min_lr_ratio * lr at the last step (0: decay to zero)")


class CheckpointConfig(Node):
    enabled: bool = knob(True, "Lightning checkpoints under <run dir>/checkpoints (callbacks.model_checkpoint)")
    every_n_steps: int = knob(21, "save every N optimizer steps", ge=1)
    keep: int = knob(1, "newest N step checkpoints kept (-1: all)", ge=-1)
    save_last: Literal["link", True, False] = knob("link", "last.ckpt: link (symlink to the newest), true (copy), false")


class FreezeConfig(Node):
    mode: Literal["none", "ranked", "last", "first", "layers"] = knob("none", "which decoder layers are frozen during CPT")
    k: int | None = knob(None, "layers to freeze (ranked, last, first)", ge=0)
    ranking: str | None = knob(None, "ranked: ranking.json or its run dir (null: Spectrum SNR of the base model)")
    layers: list[int] | None = knob(None, "layers: the layer indices to freeze")
    modules: str | list[str] = knob("all", "what freezing a layer covers: all, attn, mlp, or module names")
    embeddings: Literal["none", "input", "output", "both", True, False] = knob(
        "none", "also freeze embeddings (tied embeddings freeze together)"
    )

    @model_validator(mode="after")
    def _needs(self) -> FreezeConfig:
        if self.mode in ("ranked", "last", "first") and self.k is None:
            raise ValueError(f"freeze={self.mode} needs freeze.k (the number of layers to freeze)")
        if self.mode == "layers" and self.layers is None:
            raise ValueError("freeze=layers needs freeze.layers, e.g. freeze.layers=[0,3,7]")
        return self


# --------------------------------------------------------------------------------------- analysis


class ImpactConfig(Node):
    name: str = knob("combined", "the proxy's name: a preset of the impact group, or custom")
    components: dict[str, float] = knob({"rel_change": 1.0}, "metric column -> weight; layer score = sum weight * mean percentile")
    domain_weight: float = knob(0.0, "posterior: score = general recovery - domain_weight * domain NLL increase", ge=0.0)
    groups: bool = knob(False, "posterior: also measure attn and mlp groups (3 restores per layer)")
    calibration_tokens: int = knob(4096, "posterior, grad_delta: scored tokens per corpus, from the proxy's calibration part "
                                         "(never evaluated)", ge=64)

    @model_validator(mode="after")
    def _known(self) -> ImpactConfig:
        from spear.analysis.metrics import columns

        if self.name not in (*IMPACT_NAMES, "custom"):
            raise ValueError(f"impact.name={self.name!r} is unknown; use one of {', '.join(IMPACT_NAMES)} (or custom with impact.components)")
        if not self.components:
            raise ValueError("impact.components is empty; give metric columns and weights, e.g. {rel_change: 1.0}")
        unknown = [c for c in self.components if c not in columns()]
        if unknown:
            raise ValueError(f"impact.components names unknown metric column(s) {', '.join(unknown)}; known: {', '.join(columns())}")
        return self


class SpectraConfig(Node):
    method: Literal["auto", "svd", "gram", "gram64"] = knob("auto", "singular values: auto (svd on cuda, gram on cpu), svd, gram, gram64")
    batch_mb: float = knob(16, "max MiB of same-shape matrices stacked per model and batch", gt=0)
    workers: Literal["auto"] | Annotated[int, Field(ge=0)] = knob("auto", "cpu: parallel single-threaded spectra workers (0: torch threading)")


class MetricsConfig(Node):
    swci_importance: Literal["snr_gd", "snr", "snr_gd_percentile", "snr_percentile"] = knob("snr_gd", "importance(Wb) in swci")
    svdr_threshold: Literal["gd", "mp"] = knob("gd", "noise threshold delimiting the base's signal part in svdr")
    position_mode: Literal["edges", "first", "last"] = knob("edges", "the position control: edges, first or last layers high")


class CorpusConfig(Node):
    name: str = knob("wikipedia", "the corpus' name in results.json (perplexity, nll)")
    source: str = knob("general_text", "embedded asset name (general_chat, general_text, general_news, finance_heldout, "
                                       "finance_validation, gnucash_heldout) or a file")
    kind: Literal["auto", "text", "chat"] = knob(
        "auto", "text: NLL of raw text | chat: NLL of the answers of {question, answer} JSONL records as assistant turns "
                "(chat template) | auto: chat for .jsonl files and general_chat")
    max_tokens: int | None = knob(4096, "scored tokens evaluated: text, the first n; chat, whole records until n answer "
                                        "tokens (null: all); calibration reads what follows", ge=2)


class ProxyConfig(Node):
    """The general and domain NLL proxies: eval's perplexity, impact=posterior, policy=target_retention."""

    general: CorpusConfig = knob(CorpusConfig(name="general_chat", source="general_chat", max_tokens=8192),
                                 "general corpus: the frontier's general axis (default: GSM8K answers in the chat template)")
    domain: CorpusConfig = knob(CorpusConfig(name="finance_heldout", source="finance_heldout", max_tokens=8192),
                                "held-out domain corpus: the frontier's domain axis")
    reported: list[CorpusConfig] = knob(
        [CorpusConfig(), CorpusConfig(name="general_news", source="general_news")],
        "corpora evaluated and reported beside the two axes (raw-text Wikipedia and general news by default)")
    max_length: int = knob(512, "window length in tokens (clipped to the model's max positions)", ge=2)
    stride: int = knob(256, "window step: each token is scored once, with >= max_length - stride context", ge=1)
    batch_size: int = knob(4, "windows (or chat records) per forward pass", ge=1)

    @model_validator(mode="after")
    def _windows(self) -> ProxyConfig:
        if self.stride > self.max_length:
            raise ValueError(f"proxy.stride={self.stride} must be <= proxy.max_length={self.max_length}")
        names = [self.general.name, self.domain.name, *(c.name for c in self.reported)]
        twice = sorted({n for n in names if names.count(n) > 1})
        if twice:
            raise ValueError(f"the proxy corpus name {twice[0]!r} is used twice (proxy.general, proxy.domain, "
                             "proxy.reported); give each corpus its own name")
        return self


# ---------------------------------------------------------------------------------------- policy


class PolicyBase(Node):
    label: str | None = knob(None, "the model's name in summaries (null: derived from the policy)")
    granularity: Granularity = knob("layer", "layer: one t per decoder layer | module: one t per (layer, attn/mlp)")
    non_layer_t: Strength = knob(0.0, "t of embeddings, final norm and lm_head")


class ConservativePolicy(PolicyBase):
    name: Literal["conservative"] = "conservative"
    fraction: Fraction = knob(0.25, "share of units restored: ceil(fraction * n), top of the ranking first")
    t: Strength = knob(0.5, "t of the selected units")


class BalancedPolicy(PolicyBase):
    name: Literal["balanced"] = "balanced"
    fraction: Fraction = knob(0.5, "share of units restored: ceil(fraction * n), top of the ranking first")
    t_max: Strength = knob(1.0, "t of the highest-scored unit; the others in proportion to their score")
    normalise: Literal["max", "minmax"] = knob("max", "max: t = t_max*max(s,0)/s_max | minmax: t = t_max*(s-min)/(max-min)")


class AggressivePolicy(PolicyBase):
    name: Literal["aggressive"] = "aggressive"
    fraction: Fraction = knob(0.75, "share of units restored: ceil(fraction * n), top of the ranking first")
    t: Strength = knob(1.0, "t of the selected units (1 = the post-hoc twin of freezing them)")


class TopKPolicy(PolicyBase):
    name: Literal["top_k"] = "top_k"
    k: int = knob(8, "number of top-ranked units restored", ge=0)
    t: Strength = knob(1.0, "t of the selected units")


class ThresholdPolicy(PolicyBase):
    name: Literal["threshold"] = "threshold"
    threshold: float = knob(0.5, "units whose score is strictly above this (scores are mean percentiles in [0, 1])")
    t: Strength = knob(1.0, "t of the selected units")


class UniformPolicy(PolicyBase):
    name: Literal["uniform"] = "uniform"
    t: Strength = knob(0.5, "t of every decoder layer (set non_layer_t too for a whole-model merge)")


class LayersPolicy(PolicyBase):
    name: Literal["layers"] = "layers"
    layers: list[int | str] = knob([], "layer indices; with granularity=module also '3.attn' / '3.mlp'")
    t: Strength = knob(1.0, "t of the listed units")


class LinesPolicy(PolicyBase):
    name: Literal["lines"] = "lines"
    t_first: Strength = knob(1.0, "t of layer 0 (LiNeS: shallow layers stay closest to the base)")
    t_last: Strength = knob(0.0, "t of the last layer; t of layer l = t_first + (t_last - t_first) * l/(L-1)")


class TargetRetentionPolicy(PolicyBase):
    name: Literal["target_retention"] = "target_retention"
    target: float = knob(0.99, "value of `metric` to reach on the general proxy")
    metric: Literal["retention", "recovery"] = knob("retention", "retention: nll(base)/nll(model) | recovery: share of the CPT damage undone")
    fraction: Fraction = knob(0.5, "balanced map: share of units restored")
    t_max: Strength = knob(1.0, "balanced map: t of the highest-scored unit at scale 1")
    normalise: Literal["max", "minmax"] = knob("max", "balanced map normalisation")
    max_scale: float = knob(1.0, "search the scale in [0, max_scale] (t clipped to 1)", gt=0.0)
    tol: float = knob(0.02, "bisection stops when the scale interval is narrower than this", gt=0.0)
    max_evals: int = knob(12, "at most this many proxy evaluations (plus base and adapted)", ge=1)
    calibration_tokens: int = knob(4096, "scored tokens of the general proxy's calibration part the search measures", ge=64)


class OptimizedPolicy(PolicyBase):
    name: Literal["optimized"] = "optimized"
    domain_weight: float = knob(1.0, "lambda: the fit minimises general NLL + lambda * domain NLL on calibration text", ge=0.0)
    fit_non_layer: bool = knob(True, "fit embeddings, final norm and lm_head as one more unit (false: non_layer_t)")
    tie_layers: bool = knob(False, "one t shared by every decoder layer: with fit_non_layer, the two-parameter baseline "
                                   "(a uniform merge whose non-layer tensors get their own fitted t)")
    init_t: Strength = knob(0.5, "every unit's t before the fit (the uniform point it starts from)")
    steps: int = knob(10, "Adam steps on logit(t); each is a forward and backward pass over 2 x windows_per_step windows", ge=1)
    lr: float = knob(0.3, "Adam learning rate on logit(t)", gt=0.0)
    window: int = knob(256, "tokens per calibration window", ge=16)
    windows_per_step: int = knob(1, "windows of each corpus per step (sampled from the calibration slice)", ge=1)
    calibration_tokens: int = knob(4096, "scored tokens per corpus from the proxy's calibration part: the fit's text", ge=64)
    report_tokens: int = knob(512, "tokens per corpus (the calibration part's first) on which the objective is reported "
                                   "before and after the fit, a forward pass each time (0: not reported)", ge=0)
    seed: int = knob(0, "seed of the window sampling")


PolicyConfig = Annotated[
    Union[ConservativePolicy, BalancedPolicy, AggressivePolicy, TopKPolicy, ThresholdPolicy, UniformPolicy,  # noqa: UP007
          LayersPolicy, LinesPolicy, TargetRetentionPolicy, OptimizedPolicy],
    Field(discriminator="name"),
]
NEEDS_RANKING = ("conservative", "balanced", "aggressive", "top_k", "threshold", "target_retention")


# ----------------------------------------------------------------------------------------- merge


class MergeBase(Node):
    max_shard_size: str | int = knob("2GB", "output shard size (2GB = 2e9 bytes, 2GiB = 2^30)")
    check_values: bool = knob(True, "refuse NaN/Inf in either checkpoint")
    threads: int | None = knob(1, "torch threads for the merge math (memory-bound; null: torch default)", ge=1)

    def kernel_params(self) -> dict[str, Any]:
        """The kernel's own parameters (what the merge math depends on besides ``t``)."""
        return self.model_dump(exclude={"name", *MergeBase.model_fields})


class SlerpMerge(MergeBase):
    name: Literal["slerp"] = "slerp"
    dot_threshold: float | None = knob(None, "null: lerp only when sin(angle) ~ 0 | 0.9995 reproduces mergekit", gt=0.0, le=1.0)


class LinearMerge(MergeBase):
    name: Literal["linear"] = "linear"


class TaskArithmeticMerge(MergeBase):
    name: Literal["task_arithmetic"] = "task_arithmetic"


class TiesMerge(MergeBase):
    name: Literal["ties"] = "ties"
    density: float = knob(0.2, "fraction of delta entries kept (largest magnitude)", gt=0.0, le=1.0)


class DareMerge(MergeBase):
    name: Literal["dare"] = "dare"
    density: float = knob(0.2, "fraction of delta entries kept, then rescaled by 1/density", gt=0.0, le=1.0)
    seed: int = knob(0, "seed of the drop masks (with the tensor name)")


class DgHardMerge(MergeBase):
    name: Literal["dg_hard"] = "dg_hard"
    scope: Literal["restored", "all"] = knob(
        "restored", "restored: filter the delta of tensors with t > 0 (with a policy) | all: every tensor, t=0 "
        "included (DG-Hard alone: policy=uniform policy.t=0)")


MergeConfig = Annotated[
    Union[SlerpMerge, LinearMerge, TaskArithmeticMerge, TiesMerge, DareMerge, DgHardMerge],  # noqa: UP007
    Field(discriminator="name"),
]


# ------------------------------------------------------------------------------------------ eval


class EvalSeeds(Node):
    random: int = knob(0, "lm-eval's python random seed")
    numpy: int = knob(1234, "lm-eval's numpy seed")
    torch: int = knob(1234, "lm-eval's torch seed")
    fewshot: int = knob(1234, "lm-eval's few-shot sampling seed")


class CustomTask(Node):
    """A benchmark of your own from a file (spear.evaluation.custom)."""

    name: str = knob("custom", "its name in results.json", pattern=r"^[A-Za-z][A-Za-z0-9_]*$")
    path: str = knob("", "a JSONL or CSV file (perplexity: also a .txt file)", min_length=1)
    kind: Literal["multiple_choice", "generate", "perplexity", "chat_nll"] = knob(
        "multiple_choice", "multiple_choice: question, choices, answer | generate: question, answer | perplexity: text | "
        "chat_nll: question, answer (NLL of the answer as the assistant turn of the chat template)")
    role: Literal["general", "domain"] = knob("domain", "enters general retention or domain-gain preservation")
    format: Literal["spear", "fpb", "fiqa_sa", "headline", "finqa"] = knob(
        "spear", "spear: the fields above | a public finance benchmark's published file (sets kind; licence recorded)")
    max_new_tokens: int = knob(32, "generate: at most this many greedy tokens, up to the first newline", ge=1)


class FinancePack(Node):
    """Public finance benchmarks from the user's copies, in their published formats (licence recorded)."""

    fpb: str | None = knob(None, "Financial PhraseBank `Sentences_*.txt` (CC BY-NC-SA 3.0: non-commercial)")
    fiqa_sa: str | None = knob(None, "FiQA 2018 task 1 JSON (`task1_*_ABSA_*.json`)")
    headline: str | None = knob(None, "the gold commodity news headlines CSV (Sinha & Khandait 2021)")
    finqa: str | None = knob(None, "a FinQA split JSON (`test.json`)")


class EvalConfig(Node):
    name: str = knob("quick", "the suite's name (recorded in results.json)")
    tasks: list[str] = knob([], "lm-eval task/group names: spear_* local tasks or any lm-eval task")
    limit: int | float | None = knob(None, "examples per task (first n; a float < 1 is a fraction); null: all", gt=0)
    limits: dict[str, int | float] = knob({}, "per-task override of limit (for a group: per member task)")
    num_fewshot: int | dict[str, int] | None = knob(None, "int for every task, task -> int, or null (each task's default)")
    batch_size: int | Literal["auto"] = knob("auto", "lm-eval batch size: int, or auto (search on GPU, cpu_batch_size on CPU)")
    cpu_batch_size: int = knob(8, "what batch_size=auto means on CPU", ge=1)
    max_batch_size: int = knob(64, "upper bound of the auto search on GPU", ge=1)
    max_length: int | None = knob(None, "lm-eval context length in tokens (null: the model's max positions)", ge=1)
    bootstrap_iters: int = knob(0, "lm-eval stderr bootstrap iterations; 0 = no stderr (fast)", ge=0)
    log_samples: bool = knob(False, "keep per-example outputs in lm-eval's result")
    gen_kwargs: dict[str, Any] | None = knob(None, "overrides of generative tasks' settings, e.g. {max_gen_toks: 128}")
    chat_template: Literal["off", "on", "auto"] = knob(
        "off", "lm-eval prompts in the tokenizer's chat template: off | on (an error without one) | auto (when it has one)")
    fewshot_as_multiturn: bool = knob(False, "with the chat template: few-shot examples as earlier turns")
    custom: list[CustomTask] = knob([], "your own benchmarks from files: [{name, path, kind, role}]")
    finance_pack: FinancePack = knob(FinancePack(), "public finance benchmarks from local files (domain role)")
    seeds: EvalSeeds = knob(EvalSeeds(), "lm-eval's seeds")
    primary_metrics: list[str] = knob(
        ["acc", "acc_norm", "exact_match,flexible-extract", "exact_match,strict-match", "exact_match", "bits_per_byte"],
        "the metric retention uses: the first one a task reports",
    )
    primary_metric: dict[str, str] = knob({}, "per-task override, e.g. {spear_hellaswag: acc_norm}")
    general_tasks: list[str] = knob([], "tasks whose retention enters general_retention")
    domain_tasks: list[str] = knob([], "tasks whose gain enters domain_gain_preservation")
    min_domain_gain: float = knob(0.0, "|adapted - base| at or below this: G undefined (null + warning)", ge=0.0)
    max_relative_stderr: float | None = knob(0.02, "a task whose standard error exceeds this share of the base score "
                                                   "stays out of general_retention/domain_gain_preservation (its own "
                                                   "retention is kept); null: every task enters", gt=0.0)

    def own_benchmarks(self) -> list[CustomTask]:
        """``eval.custom`` and the finance pack's files, as custom benchmarks (the pack's named after its format)."""
        pack = [CustomTask(name=fmt, path=path, format=fmt, role="domain")
                for fmt, path in self.finance_pack.model_dump().items() if path]
        return [*self.custom, *pack]

    @model_validator(mode="after")
    def _lists(self) -> EvalConfig:
        if len(set(self.tasks)) != len(self.tasks):
            raise ValueError(f"eval.tasks lists a task twice: {self.tasks}")
        names = [c.name for c in self.own_benchmarks()]
        clash = sorted({n for n in names if names.count(n) > 1 or n in self.tasks})
        if clash:
            raise ValueError(f"eval.custom: the name {clash[0]!r} is used twice (or by eval.tasks); give each benchmark its own name")
        for key in ("general_tasks", "domain_tasks"):
            extra = [t for t in getattr(self, key) if t not in self.tasks]
            if extra:
                raise ValueError(f"eval.{key} names {', '.join(extra)}, which eval.tasks does not evaluate; add them there or drop them")
        return self


# ------------------------------------------------------------------------------- options per group

_GENERAL = ["spear_arc_easy", "spear_arc_challenge", "spear_hellaswag", "spear_boolq", "spear_mmlu_general", "spear_gsm8k_bpb"]
_FINANCE = ["spear_mmlu_finance", "spear_mmlu_finance_cloze"]
IMPACT_COMPONENTS: dict[str, tuple[dict[str, float], str]] = {
    "combined": ({"rel_change": 1.0}, "the validated default: relative change (Spearman +0.43 with the posterior)"),
    "spectral": ({"swci": 0.5, "svdr_whole": 0.5}, "SPEC §1.3 mix alpha*swci + (1-alpha)*svdr_whole (Spearman -0.15)"),
    "swci": ({"swci": 1.0}, "SNR-weighted change intensity"),
    "svdr": ({"svdr": 1.0}, "singular value drop over the base's signal part"),
    "sv_shift": ({"sv_shift": 1.0}, "spectrum shift in either direction"),
    "snr": ({"snr_base": 1.0}, "Spectrum SNR of the base matrices"),
    "rel_change": ({"rel_change": 1.0}, "relative Frobenius change"),
    "random": ({"random": 1.0}, "control: seeded random scores"),
    "position": ({"position": 1.0}, "control: layer position (metrics.position_mode)"),
    "posterior": ({"rel_change": 1.0}, "measured: restore each layer alone and measure the proxy (components: the cheap proxy beside it)"),
    "grad_delta": ({"rel_change": 1.0}, "first-order posterior: grad of the proxy NLL . (base - adapted) per unit, one backward pass per corpus"),
}
IMPACT_NAMES = tuple(IMPACT_COMPONENTS)

GROUP_OPTIONS: dict[str, dict[str, Node]] = {
    "paths": {"default": PathsConfig()},
    "model": {
        "smollm2_135m": ModelConfig(),
        "tiny_llama": ModelConfig(ref="tiny_llama"),
        "tiny_gemma": ModelConfig(ref="tiny_gemma"),
        "llama31_8b": ModelConfig(ref="meta-llama/Llama-3.1-8B", dtype="bfloat16", allow_network=True),
    },
    "data": {
        "finance_default": DataConfig(paths=["asset:finance_train"], doc_separator=NEWS_ARTICLE_SEPARATOR),
        "gnucash_guide": DataConfig(paths=["asset:gnucash_train"]),
        "text": DataConfig(format="text"),
        "jsonl": DataConfig(format="jsonl"),
    },
    "optim": {"default": OptimConfig()},
    "checkpoint": {"default": CheckpointConfig()},
    "freeze": {
        "none": FreezeConfig(),
        "ranked": FreezeConfig(mode="ranked", k=8),
        "last": FreezeConfig(mode="last", k=8),
        "first": FreezeConfig(mode="first", k=8),
        "layers": FreezeConfig(mode="layers", layers=[]),
    },
    "impact": {name: ImpactConfig(name=name, components=comps) for name, (comps, _) in IMPACT_COMPONENTS.items()},
    "spectra": {"default": SpectraConfig()},
    "metrics": {"default": MetricsConfig()},
    "proxy": {"default": ProxyConfig()},
    "policy": {
        "conservative": ConservativePolicy(),
        "balanced": BalancedPolicy(),
        "aggressive": AggressivePolicy(),
        "top_k": TopKPolicy(),
        "threshold": ThresholdPolicy(),
        "uniform": UniformPolicy(),
        "layers": LayersPolicy(),
        "lines": LinesPolicy(),
        "target_retention": TargetRetentionPolicy(),
        "optimized": OptimizedPolicy(),
    },
    "merge": {
        "slerp": SlerpMerge(),
        "linear": LinearMerge(),
        "task_arithmetic": TaskArithmeticMerge(),
        "ties": TiesMerge(),
        "dare": DareMerge(),
        "dg_hard": DgHardMerge(),
    },
    "eval": {
        "quick": EvalConfig(tasks=["spear_arc_easy"], limits={"spear_arc_easy": 250}, general_tasks=["spear_arc_easy"]),
        "perplexity": EvalConfig(name="perplexity"),
        "general": EvalConfig(name="general", tasks=_GENERAL, bootstrap_iters=1000,
                              primary_metric={"spear_hellaswag": "acc_norm"}, general_tasks=_GENERAL),
        "finance": EvalConfig(name="finance", tasks=_FINANCE, bootstrap_iters=1000,
                              primary_metric={"spear_mmlu_finance_cloze": "acc_norm"}, domain_tasks=_FINANCE),
        "full": EvalConfig(name="full", tasks=[*_GENERAL, "spear_gsm8k", *_FINANCE], bootstrap_iters=1000,
                           primary_metric={"spear_hellaswag": "acc_norm", "spear_mmlu_finance_cloze": "acc_norm"},
                           general_tasks=[*_GENERAL, "spear_gsm8k"], domain_tasks=_FINANCE),
    },
}
OPTION_HELP: dict[str, dict[str, str]] = {
    "impact": {name: text for name, (_, text) in IMPACT_COMPONENTS.items()},
    "eval": {
        "quick": "ARC-Easy (first 250) + the proxy perplexities: a few minutes on a 2-core CPU",
        "perplexity": "the proxy perplexities only (~35 s per model on SmolLM2, CPU): sweeps",
        "general": "ARC, HellaSwag, BoolQ, MMLU general, GSM8K bits-per-byte",
        "finance": "MMLU finance subjects (MC and cloze)",
        "full": "general + finance + generative GSM8K (GPU)",
    },
}
