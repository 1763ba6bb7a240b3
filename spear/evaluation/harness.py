"""Evaluate an in-memory model with lm-eval (local ``spear_*`` tasks or any lm-eval task) and
sliding-window perplexity, as described by an ``eval`` suite config (``conf/eval/*.yaml``).

:func:`evaluate_model` is what ``spear.evaluate`` and the pipeline call; it returns the content
of ``results.json`` (SPEC §2.6)::

    {"model": str, "suite": str,
     "tasks": {task: {metric: value, "<metric>_stderr": value}},   # requested tasks / groups
     "perplexity": {corpus: ppl}, "nll": {corpus: mean nll}, "tokens": {corpus: int},
     "primary_metric": {task: metric}, "higher_is_better": {task: {metric: bool}},
     "n_samples": {task: int}, "subtasks": {leaf task of a group: {metric: value}},
     "settings": {...}, "seconds": {"lm_eval": float, "perplexity": float}}

Metric names are lm-eval's with the ``,none`` filter suffix dropped (``acc``, ``acc_norm``);
metrics of filtered tasks keep it (``exact_match,flexible-extract``). Stderrs are ``None``
when ``bootstrap_iters`` is 0.
"""

from __future__ import annotations

import difflib
import functools
import logging
import math
import time
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

from spear.errors import SpearError
from spear.evaluation.retention import LOWER_IS_BETTER

log = logging.getLogger(__name__)

TASKS_DIR = Path(__file__).resolve().parent / "tasks"
LOCAL_PREFIX = "spear_"
# metric preference for the one number per task that retention uses (first present wins)
DEFAULT_PRIMARY = ("acc", "acc_norm", "exact_match,flexible-extract", "exact_match,strict-match", "exact_match", "bits_per_byte")


# ----------------------------------------------------------------------------- task resolution
class _DropExpectedNotices(logging.Filter):
    """lm-eval warns about what spear does on purpose (data hooks, in-memory models)."""

    EXPECTED = ("Custom kwargs can be passed", "`pretrained` model kwarg is not of type", "Passed an already-initialized model")

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not any(text in message for text in self.EXPECTED)


def _quiet_lm_eval() -> None:
    for name in ("lm_eval.api.task", "lm_eval.models.huggingface"):
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropExpectedNotices) for f in logger.filters):
            logger.addFilter(_DropExpectedNotices())
    try:
        import datasets

        datasets.disable_progress_bars()
    except Exception:  # pragma: no cover - datasets is a dependency
        pass


@functools.lru_cache(maxsize=2)
def _task_manager(include_defaults: bool):
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=str(TASKS_DIR), include_defaults=include_defaults)


def local_task_names() -> list[str]:
    """The ``spear_*`` tasks and groups shipped in ``spear/evaluation/tasks`` (not group members)."""
    tm = _task_manager(False)
    members = {m for tag in tm.all_tags for m in (tm.task_index[tag].tags or ())}
    return [n for n in tm.all_tasks if n not in members and n not in tm.all_tags]


def task_manager(names: Iterable[str]):
    """A TaskManager that knows every name (lm-eval's own index only when a name needs it).

    An unknown name is a SpearError listing close matches.
    """
    names = list(names)
    local = _task_manager(False)
    missing = [n for n in names if n not in local.all_tasks]
    if not missing:
        return local
    # a misspelt spear_* name needs no scan of lm-eval's ~15k task configs
    index = local if all(n.startswith(LOCAL_PREFIX) for n in missing) else _task_manager(True)
    unknown = [n for n in names if n not in index.all_tasks]
    if unknown:
        hints = []
        for n in unknown:
            close = difflib.get_close_matches(n, index.all_tasks, n=5, cutoff=0.6)
            hints.append(f"{n!r} (did you mean: {', '.join(close)}?)" if close else f"{n!r} (no close match)")
        raise SpearError(
            f"eval.tasks: unknown lm-eval task {'; '.join(hints)}; spear's local tasks are "
            f"{', '.join(local_task_names())}, and any lm-eval task name works"
        )
    return index


def _limit_count(limit: Any, n_docs: int, name: str) -> int | None:
    if limit is None:
        return None
    if isinstance(limit, bool) or not isinstance(limit, int | float) or limit <= 0:
        raise SpearError(f"eval.limits.{name}={limit!r}: use a positive number of examples (or a fraction < 1), or null")
    if isinstance(limit, float) and limit < 1:
        return max(1, math.ceil(n_docs * limit))
    return min(int(limit), n_docs)


def _plain(obj: Any) -> Any:
    """OmegaConf nodes -> plain containers (config values may come either way)."""
    try:
        from omegaconf import DictConfig, ListConfig, OmegaConf

        if isinstance(obj, DictConfig | ListConfig):
            return OmegaConf.to_container(obj, resolve=True)
    except ImportError:  # pragma: no cover
        pass
    return obj


def _get(cfg: Any, key: str, default: Any = None) -> Any:
    value = cfg.get(key, default) if cfg is not None else default
    return default if value is None and default is not None else _plain(value)


# ----------------------------------------------------------------------------- lm-eval
def _batch_size(eval_cfg, device) -> int | str:
    batch = _get(eval_cfg, "batch_size", "auto")
    if str(batch).startswith("auto"):
        return str(batch) if getattr(device, "type", str(device)) == "cuda" else int(_get(eval_cfg, "cpu_batch_size", 8))
    try:
        return int(batch)
    except (TypeError, ValueError):
        raise SpearError(f"eval.batch_size={batch!r}: use an integer or auto") from None


def run_lm_eval(model, tokenizer, eval_cfg) -> dict[str, Any] | None:
    """lm-eval's ``simple_evaluate`` on the suite's tasks with per-task limits; the raw result dict."""
    names = [str(n) for n in (_get(eval_cfg, "tasks") or [])]
    if not names:
        return None
    if len(set(names)) != len(names):
        raise SpearError(f"eval.tasks lists a task twice: {names}")
    _quiet_lm_eval()
    from lm_eval import simple_evaluate
    from lm_eval.api.group import Group
    from lm_eval.models.huggingface import HFLM

    tm = task_manager(names)
    limits = _get(eval_cfg, "limits") or {}
    default_limit = _get(eval_cfg, "limit")
    fewshot = _get(eval_cfg, "num_fewshot")
    if fewshot is not None and not isinstance(fewshot, int | Mapping):
        raise SpearError(f"eval.num_fewshot={fewshot!r}: use an integer, a mapping task -> integer, or null")
    unknown_limits = sorted(set(limits) - set(names))
    if unknown_limits:
        log.warning("eval.limits names tasks that are not in eval.tasks (ignored): %s", ", ".join(unknown_limits))

    objects: list[Any] = []
    samples: dict[str, list[int]] = {}
    owner: dict[str, str] = {}
    for name in names:
        loaded = tm.load([name])
        top = loaded["groups"].get(name)
        leaves = loaded["tasks"]
        if isinstance(top, Group):
            objects.append(top)
        else:  # a task, or a tag: its tasks
            objects.extend(leaves.values())
        for leaf_name, task in leaves.items():
            if leaf_name in owner:
                raise SpearError(f"eval.tasks: task {leaf_name!r} is part of both {owner[leaf_name]!r} and {name!r}; list it once")
            owner[leaf_name] = name
            if isinstance(fewshot, Mapping) and name in fewshot and fewshot[name] is not None:
                task.set_config(key="num_fewshot", value=int(fewshot[name]))
            limit = limits.get(name, default_limit)
            if limit is not None:
                samples[leaf_name] = list(range(_limit_count(limit, len(task.eval_docs), name)))

    device = next(model.parameters()).device
    was_training = model.training  # HFLM switches the model to eval mode
    try:
        lm = HFLM(
            pretrained=model,
            tokenizer=tokenizer,
            batch_size=_batch_size(eval_cfg, device),
            max_batch_size=int(_get(eval_cfg, "max_batch_size", 64)),
            max_length=_get(eval_cfg, "max_length"),
        )
        raw = simple_evaluate(
            model=lm,
            tasks=objects,
            task_manager=tm,
            num_fewshot=fewshot if isinstance(fewshot, int) else None,
            samples=samples or None,
            bootstrap_iters=int(_get(eval_cfg, "bootstrap_iters", 0)),
            gen_kwargs=_get(eval_cfg, "gen_kwargs") or None,
            log_samples=bool(_get(eval_cfg, "log_samples", False)),
            random_seed=int(_get(eval_cfg, "seed", 0)),
            numpy_random_seed=1234,
            torch_random_seed=1234,
            fewshot_random_seed=1234,
        )
    finally:
        model.train(was_training)
    raw["spear_owner"] = owner
    return raw


def _num(value: Any) -> float | None:
    if isinstance(value, bool):
        return float(value)
    if isinstance(value, int | float) and math.isfinite(value):
        return float(value)
    return None


def _metrics_of(entry: Mapping[str, Any]) -> dict[str, float | None]:
    out: dict[str, float | None] = {}
    for key, value in entry.items():
        if "," not in key:  # alias, name, sample_len, ...
            continue
        metric, filt = key.split(",", 1)
        out[metric if filt == "none" else f"{metric},{filt}"] = _num(value)
    return out


def _is_stderr(metric: str) -> bool:
    return metric.split(",", 1)[0].endswith("_stderr")


def lower_is_better(metric: str) -> bool:
    return metric.split(",", 1)[0] in LOWER_IS_BETTER


def primary_metric(metrics: Mapping[str, Any], preference: Iterable[str] = DEFAULT_PRIMARY) -> str | None:
    """The first metric of ``preference`` the task reports (else its first non-stderr metric)."""
    for name in preference:
        if metrics.get(name) is not None:
            return name
    return next((m for m, v in metrics.items() if not _is_stderr(m) and v is not None), None)


def summarize_lm_eval(raw: Mapping[str, Any], names: list[str], eval_cfg=None) -> dict[str, Any]:
    """The ``tasks``/``subtasks``/``primary_metric``/... parts of results.json from lm-eval's output."""
    results = raw.get("results", {})
    groups = raw.get("groups", {})
    owner = raw.get("spear_owner", {})
    hib_raw = raw.get("higher_is_better", {})
    n_samples = raw.get("n-samples", {})
    preference = list(_get(eval_cfg, "primary_metrics") or DEFAULT_PRIMARY) if eval_cfg is not None else DEFAULT_PRIMARY
    overrides = (_get(eval_cfg, "primary_metric") or {}) if eval_cfg is not None else {}

    tasks: dict[str, dict[str, float | None]] = {}
    subtasks: dict[str, dict[str, float | None]] = {}
    for name, entry in results.items():
        if name in names or (owner.get(name) in names and owner[name] not in groups):
            tasks[name] = _metrics_of(entry)  # a requested task, or a task of a requested tag
        else:
            subtasks[name] = _metrics_of(entry)  # a member of a requested group
    for name in names:  # a group's aggregate (lm-eval lists groups in "groups" too)
        if name in groups and name not in tasks:
            tasks[name] = _metrics_of(groups[name])

    def _hib(name: str, metrics: Mapping[str, Any]) -> dict[str, bool]:
        declared = hib_raw.get(name, {}) or {}
        out = {}
        for metric in metrics:
            if _is_stderr(metric):
                continue
            base = metric.split(",", 1)[0]
            out[metric] = bool(declared.get(base, not lower_is_better(metric)))
        return out

    counts: dict[str, int] = {}
    for leaf, info in n_samples.items():
        top = owner.get(leaf, leaf)
        key = top if top in tasks else leaf
        counts[key] = counts.get(key, 0) + int(info.get("effective", info.get("original", 0)))
    return {
        "tasks": tasks,
        "subtasks": subtasks,
        "primary_metric": {t: overrides.get(t) or primary_metric(m, preference) for t, m in tasks.items()},
        "higher_is_better": {t: _hib(t, m) for t, m in tasks.items()},
        "n_samples": {t: counts.get(t, 0) for t in tasks},
        "n_shot": {t: raw.get("n-shot", {}).get(t) for t in tasks},
    }


# ----------------------------------------------------------------------------- perplexity corpora
def corpus_specs(eval_cfg) -> dict[str, dict[str, Any]]:
    """``eval.perplexity.corpora`` normalised to ``{name: {"source": str, "max_tokens": int|None}}``."""
    ppl = _get(eval_cfg, "perplexity") or {}
    corpora = ppl.get("corpora") or {}
    out = {}
    for name, spec in corpora.items():
        if spec is None:
            continue
        if isinstance(spec, str):
            spec = {"source": spec}
        if "source" not in spec:
            raise SpearError(f"eval.perplexity.corpora.{name} needs a source (an asset name or a text file path)")
        out[str(name)] = {"source": str(spec["source"]), "max_tokens": spec.get("max_tokens")}
    return out


def corpus_path(source: str, name: str = "corpus") -> Path:
    """The file of a corpus given as an embedded asset name (``general_text``, ...) or a path."""
    from spear.embedded import ASSET_LAYOUT, asset_path

    path = asset_path(source) if source in ASSET_LAYOUT else Path(source).expanduser()
    if not path.is_file():
        raise SpearError(
            f"eval.perplexity.corpora.{name}.source={source!r} is neither an embedded asset "
            f"({', '.join(k for k in ASSET_LAYOUT if k != 'smollm2_135m')}) nor a text file"
        )
    return path


def read_corpus(source: str, name: str = "corpus") -> str:
    return corpus_path(source, name).read_text(encoding="utf-8", errors="replace")


def run_perplexity(model, tokenizer, eval_cfg) -> dict[str, dict[str, Any]]:
    """``{corpus: {"nll", "ppl", "tokens"}}`` for the suite's corpora."""
    from spear.evaluation.perplexity import corpus_nll

    ppl_cfg = _get(eval_cfg, "perplexity") or {}
    out = {}
    for name, spec in corpus_specs(eval_cfg).items():
        start = time.perf_counter()
        text = read_corpus(spec["source"], name)
        out[name] = corpus_nll(
            model,
            tokenizer,
            text,
            max_length=int(ppl_cfg.get("max_length") or 512),
            stride=int(ppl_cfg.get("stride") or 256),
            max_tokens=spec["max_tokens"],
            batch_size=int(ppl_cfg.get("batch_size") or 4),
            progress=True,
        )
        log.info("perplexity %s: %.3f (nll %.4f, %d tokens, %.1fs)", name, out[name]["ppl"] or math.inf,
                 out[name]["nll"], out[name]["tokens"], time.perf_counter() - start)
    return out


# ----------------------------------------------------------------------------- the library entry
def check_suite(eval_cfg, check_files: bool = True) -> None:
    """Task names must exist; the general/domain lists must name tasks and corpora the suite evaluates."""
    tasks = {str(t) for t in (_get(eval_cfg, "tasks") or [])}
    if tasks:
        task_manager(sorted(tasks))  # unknown names: SpearError with close matches
    specs = corpus_specs(eval_cfg)
    for name, spec in specs.items() if check_files else ():
        corpus_path(spec["source"], name)  # missing files fail before any evaluation
    corpora = set(specs)
    for key, known, what in (("general_tasks", tasks, "eval.tasks"), ("domain_tasks", tasks, "eval.tasks"),
                             ("general_corpora", corpora, "eval.perplexity.corpora"),
                             ("domain_corpora", corpora, "eval.perplexity.corpora")):
        extra = [str(n) for n in (_get(eval_cfg, key) or []) if str(n) not in known]
        if extra:
            raise SpearError(f"eval.{key} names {', '.join(extra)}, which {what} does not evaluate; add them there or drop them")


def suite_settings(eval_cfg) -> dict[str, Any]:
    keys = ("name", "tasks", "limit", "limits", "num_fewshot", "bootstrap_iters", "perplexity",
            "general_tasks", "domain_tasks", "general_corpora", "domain_corpora")
    return {k: _get(eval_cfg, k) for k in keys}


def evaluate_model(
    model,
    tokenizer,
    eval_cfg,
    name: str,
    *,
    lm_eval_callback: Callable[[dict[str, Any]], None] | None = None,
) -> dict[str, Any]:
    """Evaluate an in-memory model on an ``eval`` suite: the content of ``results.json``.

    One model, all tasks in one lm-eval call, then the perplexity corpora. ``lm_eval_callback``
    receives lm-eval's raw result dict (``spear.evaluate`` hands it to lm-eval's WandbLogger).
    """
    check_suite(eval_cfg)
    names = [str(n) for n in (_get(eval_cfg, "tasks") or [])]
    results: dict[str, Any] = {
        "model": str(name),
        "suite": _get(eval_cfg, "name"),
        "tasks": {},
        "perplexity": {},
        "nll": {},
        "tokens": {},
        "primary_metric": {},
        "higher_is_better": {},
        "n_samples": {},
        "n_shot": {},
        "subtasks": {},
        "settings": suite_settings(eval_cfg),
        "seconds": {},
    }
    start = time.perf_counter()
    raw = run_lm_eval(model, tokenizer, eval_cfg)
    results["seconds"]["lm_eval"] = round(time.perf_counter() - start, 3)
    if raw is not None:
        results.update(summarize_lm_eval(raw, names, eval_cfg))
        if lm_eval_callback is not None:
            lm_eval_callback(raw)
    start = time.perf_counter()
    for corpus, value in run_perplexity(model, tokenizer, eval_cfg).items():
        results["perplexity"][corpus] = value["ppl"]
        results["nll"][corpus] = value["nll"]
        results["tokens"][corpus] = value["tokens"]
    results["seconds"]["perplexity"] = round(time.perf_counter() - start, 3)
    return results
