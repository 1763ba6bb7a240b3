"""Evaluate an in-memory model with lm-eval (local ``spear_*`` tasks or any lm-eval task), as the
``eval`` suite says, and on the general/domain NLL proxies, as ``proxy`` says.

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
import tempfile
import time
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

from spear.errors import SpearError
from spear.evaluation.custom import (
    ACCURACY_KINDS,
    NLL_KINDS,
    chat_answer_nll,
    describe,
    kind_of,
    load_docs,
    write_tasks,
)
from spear.evaluation.proxy import ROLES as PROXY_ROLES
from spear.evaluation.proxy import ProxyEvaluator
from spear.evaluation.retention import LOWER_IS_BETTER

log = logging.getLogger(__name__)

TASKS_DIR = Path(__file__).resolve().parent / "tasks"
LOCAL_PREFIX = "spear_"


# the primary metric of a custom benchmark (its task's metric and filter, in results.json spelling)
CUSTOM_METRIC = {"multiple_choice": "acc", "generate": "exact_match,normalised"}


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
    import datasets

    datasets.disable_progress_bars()


@functools.lru_cache(maxsize=2)
def _task_manager(include_defaults: bool):
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=str(TASKS_DIR), include_defaults=include_defaults)


def local_task_names() -> list[str]:
    """The ``spear_*`` tasks and groups shipped in ``spear/evaluation/tasks`` (not group members)."""
    tm = _task_manager(False)
    members = {m for tag in tm.all_tags for m in (tm.task_index[tag].tags or ())}
    return [n for n in tm.all_tasks if n not in members and n not in tm.all_tags]


def task_manager(names: Iterable[str], include: Path | None = None):
    """A TaskManager that knows every name (lm-eval's own index only when a name needs it; ``include``:
    one more folder of task YAML, the generated custom benchmarks).

    An unknown name is a SpearError listing close matches.
    """
    from lm_eval.tasks import TaskManager

    names = list(names)
    paths = [str(TASKS_DIR)] + ([str(include)] if include is not None else [])
    local = _task_manager(False) if include is None else TaskManager(include_path=paths, include_defaults=False)
    missing = [n for n in names if n not in local.all_tasks]
    if not missing:
        return local
    # a misspelt spear_* name needs no scan of lm-eval's ~15k task configs
    if all(n.startswith(LOCAL_PREFIX) for n in missing):
        index = local
    else:
        index = _task_manager(True) if include is None else TaskManager(include_path=paths, include_defaults=True)
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


# ----------------------------------------------------------------------------- lm-eval
def _batch_size(eval_cfg, device) -> int | str:
    if eval_cfg.batch_size == "auto":
        return "auto" if getattr(device, "type", str(device)) == "cuda" else eval_cfg.cpu_batch_size
    return eval_cfg.batch_size


def uses_chat_template(eval_cfg, tokenizer, name: str = "the model") -> bool:
    """Whether lm-eval prompts go through the tokenizer's chat template (``eval.chat_template``)."""
    has = bool(getattr(tokenizer, "chat_template", None))
    if eval_cfg.chat_template == "on" and not has:
        raise SpearError(f"eval.chat_template=on but the tokenizer of {name} has no chat template; "
                         "set eval.chat_template=auto (use it where there is one) or off")
    chat = eval_cfg.chat_template == "on" or (eval_cfg.chat_template == "auto" and has)
    if eval_cfg.fewshot_as_multiturn and not chat:
        raise SpearError("eval.fewshot_as_multiturn=true needs the chat template; set eval.chat_template=on (or auto "
                         "with a tokenizer that has one)")
    return chat


def run_lm_eval(model, tokenizer, eval_cfg, chat: bool = False, include: Path | None = None) -> dict[str, Any] | None:
    """lm-eval's ``simple_evaluate`` on the suite's tasks with per-task limits; the raw result dict
    (``include``: the folder of generated custom tasks)."""
    names = list(eval_cfg.tasks)
    if not names:
        return None
    _quiet_lm_eval()
    from lm_eval import simple_evaluate
    from lm_eval.api.group import Group
    from lm_eval.models.huggingface import HFLM

    tm = task_manager(names, include)
    limits = eval_cfg.limits
    default_limit = eval_cfg.limit
    fewshot = eval_cfg.num_fewshot
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
            max_batch_size=eval_cfg.max_batch_size,
            max_length=eval_cfg.max_length,
        )
        raw = simple_evaluate(
            model=lm,
            tasks=objects,
            task_manager=tm,
            num_fewshot=fewshot if isinstance(fewshot, int) else None,
            samples=samples or None,
            bootstrap_iters=eval_cfg.bootstrap_iters,
            gen_kwargs=eval_cfg.gen_kwargs or None,
            log_samples=eval_cfg.log_samples,
            apply_chat_template=chat,
            fewshot_as_multiturn=chat and eval_cfg.fewshot_as_multiturn,
            random_seed=eval_cfg.seeds.random,
            numpy_random_seed=eval_cfg.seeds.numpy,
            torch_random_seed=eval_cfg.seeds.torch,
            fewshot_random_seed=eval_cfg.seeds.fewshot,
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


def primary_metric(metrics: Mapping[str, Any], preference: Iterable[str]) -> str | None:
    """The first metric of ``preference`` the task reports (else its first non-stderr metric)."""
    for name in preference:
        if metrics.get(name) is not None:
            return name
    return next((m for m, v in metrics.items() if not _is_stderr(m) and v is not None), None)


def summarize_lm_eval(raw: Mapping[str, Any], names: list[str], eval_cfg) -> dict[str, Any]:
    """The ``tasks``/``subtasks``/``primary_metric``/... parts of results.json from lm-eval's output."""
    results = raw.get("results", {})
    groups = raw.get("groups", {})
    owner = raw.get("spear_owner", {})
    hib_raw = raw.get("higher_is_better", {})
    n_samples = raw.get("n-samples", {})
    preference = eval_cfg.primary_metrics
    overrides = eval_cfg.primary_metric

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


# ----------------------------------------------------------------------------- the library entry
def check_suite(eval_cfg, proxy) -> None:
    """Fail before any evaluation: every task name exists and every proxy corpus is readable."""
    if eval_cfg.tasks:
        task_manager(eval_cfg.tasks)  # unknown names: SpearError with close matches
    for entry in eval_cfg.own_benchmarks():
        load_docs(entry)  # a bad file: SpearError naming the line and the field
    ProxyEvaluator.check(proxy)


def with_custom(eval_cfg):
    """The suite with its own accuracy benchmarks (``eval.custom``) as lm-eval tasks of their role."""
    extra = [c for c in eval_cfg.own_benchmarks() if kind_of(c) in ACCURACY_KINDS]
    if not extra:
        return eval_cfg
    return eval_cfg.replace(
        custom=[], finance_pack={},
        tasks=[*eval_cfg.tasks, *(c.name for c in extra)],
        general_tasks=[*eval_cfg.general_tasks, *(c.name for c in extra if c.role == "general")],
        domain_tasks=[*eval_cfg.domain_tasks, *(c.name for c in extra if c.role == "domain")],
        primary_metric={**eval_cfg.primary_metric, **{c.name: CUSTOM_METRIC[kind_of(c)] for c in extra}},
    )


def suite_settings(eval_cfg, proxy) -> dict[str, Any]:
    """What results.json records of the suite (enough to tell whether two results are comparable)."""
    keys = ("name", "tasks", "limit", "limits", "num_fewshot", "bootstrap_iters", "general_tasks", "domain_tasks",
            "chat_template", "fewshot_as_multiturn")
    return {**eval_cfg.model_dump(include=set(keys)), "perplexity": proxy.model_dump()}


def evaluate_model(
    model,
    tokenizer,
    eval_cfg,
    proxy,
    name: str,
    *,
    progress: bool = True,
    lm_eval_callback: Callable[[dict[str, Any]], None] | None = None,
) -> dict[str, Any]:
    """Evaluate an in-memory model on an ``eval`` suite and the ``proxy`` corpora: results.json.

    One model, all tasks in one lm-eval call, then the proxy corpora. ``lm_eval_callback``
    receives lm-eval's raw result dict (``spear.evaluate`` hands it to lm-eval's WandbLogger).
    """
    check_suite(eval_cfg, proxy)
    results: dict[str, Any] = {
        "model": str(name),
        "suite": eval_cfg.name,
        "tasks": {},
        "perplexity": {},
        "nll": {},
        "tokens": {},
        "primary_metric": {},
        "higher_is_better": {},
        "n_samples": {},
        "n_shot": {},
        "subtasks": {},
        "settings": suite_settings(eval_cfg, proxy),
        "seconds": {},
    }
    results["custom"] = {entry.name: describe(entry) for entry in eval_cfg.own_benchmarks()}
    for entry_name, info in results["custom"].items():
        if info.get("non_commercial"):
            log.warning("eval.custom %r (%s) is licensed %s: non-commercial use only", entry_name, info["format"], info["licence"])
    suite = with_custom(eval_cfg)
    chat = uses_chat_template(suite, tokenizer, str(name)) if suite.tasks else False
    results["chat_template"] = chat
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="spear-custom-tasks-") as folder:
        include = Path(folder) if write_tasks(eval_cfg.own_benchmarks(), Path(folder)) else None
        raw = run_lm_eval(model, tokenizer, suite, chat, include)
    results["seconds"]["lm_eval"] = round(time.perf_counter() - start, 3)
    if raw is not None:
        results.update(summarize_lm_eval(raw, list(suite.tasks), suite))
        if lm_eval_callback is not None:
            lm_eval_callback(raw)
    start = time.perf_counter()
    evaluator = ProxyEvaluator(tokenizer, proxy, roles=(*PROXY_ROLES, "reported"))
    for role, value in evaluator.measure(model, name=name, progress=progress).items():
        results["perplexity"][value["name"]] = value["ppl"]
        results["nll"][value["name"]] = value["nll"]
        results["tokens"][value["name"]] = value["tokens"]
        if value.get("stderr") is not None:
            results.setdefault("nll_stderr", {})[value["name"]] = value["stderr"]
        log.info("proxy %s (%s): ppl %.3f, nll %.4f, %d tokens, %.1fs", role, value["name"], value["ppl"] or math.inf,
                 value["nll"], value["tokens"], value["seconds"])
    for entry in (c for c in eval_cfg.own_benchmarks() if kind_of(c) in NLL_KINDS):
        value = custom_nll(model, tokenizer, entry, proxy) if kind_of(entry) == "perplexity" else chat_answer_nll(
            model, tokenizer, entry)
        results["perplexity"][entry.name], results["nll"][entry.name] = value["ppl"], value["nll"]
        results["tokens"][entry.name] = value["tokens"]
        log.info("custom %s (%s): ppl %.3f, nll %.4f, %d tokens", entry.name, entry.role, value["ppl"] or math.inf,
                 value["nll"], value["tokens"])
    results["seconds"]["perplexity"] = round(time.perf_counter() - start, 3)
    return results


def custom_nll(model, tokenizer, entry, proxy) -> dict[str, Any]:
    """Mean NLL per token of a perplexity benchmark's documents, with the proxy's windows."""
    from spear.evaluation.perplexity import corpus_nll_from_ids, tokenize_corpus

    ids = tokenize_corpus(tokenizer, "\n\n".join(d["text"] for d in load_docs(entry)))
    value = corpus_nll_from_ids(model, ids, max_length=proxy.max_length, stride=proxy.stride, batch_size=proxy.batch_size)
    if not math.isfinite(value["nll"]):
        raise SpearError(f"the model gives a non-finite NLL on eval.custom {entry.name!r}; check its weights")
    return value
