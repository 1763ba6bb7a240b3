"""The local spear_* lm-eval tasks on the embedded eval data (tiny_llama), and the quick suite
on the embedded SmolLM2 (slow)."""

from __future__ import annotations

import math

import pytest

from spear.embedded import asset_path


def _asset_missing(*names: str) -> str | None:
    missing = [n for n in names if not asset_path(n, must_exist=False).exists()]
    return f"embedded assets not prepared ({', '.join(missing)}): run `python -m spear.assets`" if missing else None


def _declared_metrics(name: str) -> set[str]:
    """Metric keys a local task/group YAML declares, in results.json spelling."""
    from lm_eval.tasks._yaml_loader import load_yaml

    from spear.evaluation.harness import TASKS_DIR

    cfg = load_yaml(TASKS_DIR / f"{name}.yaml", resolve_func=False)
    if "group" in cfg:
        return {m["metric"] for m in cfg["aggregate_metric_list"]}
    filters = [f["name"] for f in cfg.get("filter_list") or []] or ["none"]
    return {m["metric"] if f == "none" else f"{m['metric']},{f}" for m in cfg["metric_list"] for f in filters}


@pytest.fixture(scope="module")
def tiny_results():
    reason = _asset_missing("eval_data")
    if reason:
        pytest.skip(reason)
    from spear.config.schema import CorpusConfig, EvalConfig, ProxyConfig
    from spear.evaluation.harness import evaluate_model, local_task_names
    from spear.models.tiny import build_tiny

    model, tokenizer = build_tiny("tiny_llama")
    tasks = local_task_names()
    eval_cfg = EvalConfig(name="test", tasks=tasks, limit=1, limits={"spear_hellaswag": 2}, batch_size=8, max_length=256,
                          gen_kwargs={"max_gen_toks": 8})
    proxy = ProxyConfig(general=CorpusConfig(name="general", max_tokens=64), reported=[], domain=CorpusConfig(name="domain", source="finance_heldout",
                                                                                 max_tokens=64))
    return tasks, evaluate_model(model, tokenizer, eval_cfg, proxy, "tiny_llama", progress=False)


def test_every_local_task_runs_offline_with_its_declared_metrics(tiny_results):
    tasks, results = tiny_results
    assert set(results["tasks"]) == set(tasks)
    for task in tasks:
        metrics = results["tasks"][task]
        declared = _declared_metrics(task)
        assert declared and declared <= set(metrics), (task, declared, metrics)
        for metric in declared:
            value = metrics[metric]
            assert value is not None and math.isfinite(value), (task, metric)
            if metric != "bits_per_byte":
                assert 0.0 <= value <= 1.0
        assert results["primary_metric"][task] in declared
    assert results["n_samples"]["spear_arc_easy"] == 1 and results["n_samples"]["spear_hellaswag"] == 2
    assert results["n_samples"]["spear_mmlu_finance"] == 7  # the limit applies per subject
    assert results["higher_is_better"]["spear_gsm8k_bpb"]["bits_per_byte"] is False
    assert "spear_mmlu_finance_econometrics" in results["subtasks"]
    assert set(results["perplexity"]) == {"general", "domain"} and results["tokens"] == {"general": 63, "domain": 63}


def test_gsm8k_data_has_answers():
    reason = _asset_missing("eval_data")
    if reason:
        pytest.skip(reason)
    from spear.evaluation.tasks.utils import load_gsm8k

    docs = load_gsm8k()["test"]
    assert len(docs) == 1000  # the 319 calibration-only problems (ids >= 1000) are never evaluated
    doc = docs[0]
    assert doc["context"].rstrip().endswith("Answer:") and doc["context"].count("Question:") == 9
    assert doc["continuation"].rstrip().endswith(f"So the answer is {doc['short_answer']}.")


@pytest.mark.slow
def test_quick_suite_on_smollm2(compose, tmp_path):
    reason = _asset_missing("smollm2_135m", "eval_data", "general_chat", "general_text", "general_news", "finance_heldout")
    if reason:
        pytest.skip(reason)
    from spear.evaluation.stage import run_evaluate as run

    out = run(compose("evaluate", ["model=smollm2_135m", "eval=quick"], output_dir=tmp_path / "quick"))
    results = out["results"]
    arc = results["tasks"]["spear_arc_easy"]
    assert results["n_samples"]["spear_arc_easy"] >= 200
    assert 0.35 <= arc["acc"] <= 0.65
    for corpus in ("general_chat", "finance_heldout", "wikipedia", "general_news"):
        assert 1.0 < results["perplexity"][corpus] < 1000.0
        assert results["tokens"][corpus] > 1000
    assert 0 < results["nll_stderr"]["general_chat"] < 0.2  # chat answers carry their standard error
    assert (tmp_path / "quick" / "results.json").is_file() and (tmp_path / "quick" / "results.md").is_file()


CHAT = ("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
        "{% if add_generation_prompt %}<|assistant|>{% endif %}")


def test_chat_template_reaches_lm_eval_prompts_and_is_refused_where_there_is_none():
    reason = _asset_missing("eval_data")
    if reason:
        pytest.skip(reason)
    from spear.config.schema import EvalConfig
    from spear.errors import SpearError
    from spear.evaluation.harness import run_lm_eval, uses_chat_template
    from spear.models.tiny import build_tiny

    model, tokenizer = build_tiny("tiny_llama")
    suite = {"tasks": ["spear_arc_easy"], "limit": 2, "batch_size": 4, "max_length": 256, "log_samples": True}
    with pytest.raises(SpearError, match="eval.chat_template=on but the tokenizer of tiny has no chat template"):
        uses_chat_template(EvalConfig(**suite, chat_template="on"), tokenizer, "tiny")
    assert uses_chat_template(EvalConfig(**suite, chat_template="auto"), tokenizer) is False
    tokenizer.chat_template = CHAT
    cfg = EvalConfig(**suite, chat_template="auto")
    chat = uses_chat_template(cfg, tokenizer)
    prompts = {}
    for use in (False, chat):
        raw = run_lm_eval(model, tokenizer, cfg, use)
        prompts[use] = raw["samples"]["spear_arc_easy"][0]["arguments"][0][0]
    assert chat is True and prompts[True].startswith("<|user|>") and "<|user|>" not in prompts[False]
