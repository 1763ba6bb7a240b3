"""Evaluation without the embedded eval data: perplexity, retention math, suites, bad inputs."""

from __future__ import annotations

import json
import logging
import math

import pytest
import torch

from spear.errors import SpearError
from spear.evaluation.perplexity import corpus_nll_from_ids, sliding_windows, tokenize_corpus
from spear.evaluation.retention import compute_retention, gain_preservation, retention

TEXT = (
    "The quick brown fox jumps over the lazy dog. A ledger records debits and credits; "
    "a balance sheet lists assets, liabilities and equity. "
) * 12


@pytest.fixture(scope="module")
def tiny():
    from spear.models.tiny import build_tiny

    return build_tiny("tiny_llama")


# ----------------------------------------------------------------------------- perplexity
@pytest.mark.parametrize("n,length,stride", [(10, 16, 8), (100, 16, 8), (100, 16, 16), (101, 32, 5), (64, 32, 31), (33, 32, 1)])
def test_windows_score_every_token_once_with_enough_context(n, length, stride):
    windows = sliding_windows(n, length, stride)
    scored = []
    for begin, end, count in windows:
        assert 0 <= begin < end <= n and 1 <= count <= end - begin - 1
        assert end - begin == min(length, n)  # full windows only: no padding needed
        first = end - count
        scored += list(range(first, end))
        if begin > 0:
            assert first - begin >= length - min(stride, length - 1)  # context of the first scored token
    assert scored == list(range(1, n))  # each token after the first, exactly once, in order


def _reference_nll(model, ids, length, stride):
    """Window-by-window loop without batching or logits_to_keep."""
    total, count = 0.0, 0
    for begin, end, n in sliding_windows(len(ids), length, stride):
        with torch.no_grad():
            logits = model(ids[begin:end][None]).logits[0].float()
        logprobs = torch.log_softmax(logits[:-1], dim=-1)
        targets = ids[begin + 1 : end]
        token_lp = logprobs.gather(-1, targets[:, None])[:, 0]
        total -= float(token_lp[-n:].sum())
        count += n
    return total / count, count


def corpus_nll(model, tok, text, *, max_length=512, stride=256, max_tokens=None, batch_size=4):
    """What the proxy evaluator does per corpus: tokenise once (first max_tokens), then score windows."""
    ids = tokenize_corpus(tok, text, max_tokens)
    return corpus_nll_from_ids(model, ids, max_length=max_length, stride=stride, batch_size=batch_size)


def test_single_window_equals_direct_nll(tiny):
    model, tok = tiny
    ids = tokenize_corpus(tok, TEXT, max_tokens=200)
    with torch.no_grad():
        direct = float(model(ids[None], labels=ids[None]).loss)
    out = corpus_nll_from_ids(model, ids, max_length=256, stride=64, batch_size=4)
    assert out["tokens"] == 199
    assert out["nll"] == pytest.approx(direct, rel=1e-5)
    assert out["ppl"] == pytest.approx(math.exp(direct), rel=1e-5)
    # stride does not matter when the text fits in one window
    assert corpus_nll_from_ids(model, ids, max_length=200, stride=7, batch_size=4)["nll"] == pytest.approx(out["nll"], rel=1e-6)


def test_sliding_windows_match_reference_and_batching(tiny):
    model, tok = tiny
    ids = tokenize_corpus(tok, TEXT, max_tokens=700)
    expected, count = _reference_nll(model, ids, 128, 48)
    for batch_size in (1, 3, 16):
        out = corpus_nll_from_ids(model, ids, max_length=128, stride=48, batch_size=batch_size)
        assert out["tokens"] == count == 699
        assert out["nll"] == pytest.approx(expected, rel=1e-5)
    # deterministic
    assert corpus_nll_from_ids(model, ids, max_length=128, stride=48, batch_size=4)["nll"] == corpus_nll_from_ids(
        model, ids, max_length=128, stride=48, batch_size=4
    )["nll"]


def test_corpus_nll_tokenises_once_and_cuts_at_max_tokens(tiny):
    model, tok = tiny
    full = tokenize_corpus(tok, TEXT)
    assert torch.equal(tokenize_corpus(tok, TEXT, max_tokens=300), full[:300])
    out = corpus_nll(model, tok, TEXT, max_length=64, stride=32, max_tokens=300)
    assert out["tokens"] == 299
    assert out["nll"] == pytest.approx(corpus_nll_from_ids(model, full[:300], max_length=64, stride=32, batch_size=2)["nll"])
    # max_length above the model's positions is clipped, not an index error
    assert corpus_nll(model, tok, TEXT * 3, max_length=4096, stride=4096)["tokens"] == len(tokenize_corpus(tok, TEXT * 3)) - 1


def test_corpus_nll_restores_training_mode(tiny):
    model, tok = tiny
    model.train()
    try:
        corpus_nll(model, tok, TEXT, max_tokens=64)
        assert model.training
    finally:
        model.eval()


@pytest.mark.parametrize("kwargs", [{"stride": 0}, {"max_length": 1}, {"batch_size": 0}])
def test_perplexity_bad_arguments(tiny, kwargs):
    model, tok = tiny
    with pytest.raises(SpearError):
        corpus_nll(model, tok, TEXT, **kwargs)


def test_perplexity_text_too_short(tiny):
    model, tok = tiny
    with pytest.raises(SpearError, match="at least 2"):
        corpus_nll(model, tok, "a")


# ----------------------------------------------------------------------------- retention math
def test_retention_orientation():
    assert retention(0.45, 0.60) == pytest.approx(0.75)
    # NLL: a worse model (higher NLL) must come out below 1, a better one above 1
    assert retention(3.0, 2.5, lower_is_better=True) == pytest.approx(2.5 / 3.0)
    assert retention(2.0, 2.5, lower_is_better=True) == pytest.approx(1.25)
    assert retention(2.5, 2.5, lower_is_better=True) == 1.0
    assert retention(0.3, 0.0) is None and retention(None, 0.5) is None


def test_gain_preservation_scores_and_nll():
    assert gain_preservation(0.45, 0.30, 0.50) == pytest.approx(0.75)
    assert gain_preservation(0.50, 0.30, 0.50) == pytest.approx(1.0)
    assert gain_preservation(0.30, 0.30, 0.50) == pytest.approx(0.0)
    # NLL: adapted lowered it 3.0 -> 2.0; a model at 2.5 kept half of the gain
    assert gain_preservation(2.5, 3.0, 2.0, lower_is_better=True) == pytest.approx(0.5)
    assert gain_preservation(2.0, 3.0, 2.0, lower_is_better=True) == pytest.approx(1.0)
    assert gain_preservation(3.0, 3.0, 2.0, lower_is_better=True) == pytest.approx(0.0)
    assert gain_preservation(3.2, 3.0, 2.0, lower_is_better=True) == pytest.approx(-0.2)


def test_zero_domain_gain_is_none_with_warning(caplog):
    with caplog.at_level(logging.WARNING):
        assert gain_preservation(0.4, 0.3, 0.3) is None
        assert gain_preservation(2.5, 2.0, 2.0, lower_is_better=True) is None
        assert gain_preservation(0.4, 0.3, 0.3005, min_gain=0.001) is None
    assert "undefined" in caplog.text


def _results(name, arc, mmlu, gen_nll, dom_nll):
    return {
        "model": name,
        "tasks": {"spear_arc_easy": {"acc": arc, "acc_norm": arc / 2}, "spear_mmlu_finance": {"acc": mmlu}},
        "primary_metric": {"spear_arc_easy": "acc", "spear_mmlu_finance": "acc"},
        "higher_is_better": {"spear_arc_easy": {"acc": True}, "spear_mmlu_finance": {"acc": True}},
        "perplexity": {"general": math.exp(gen_nll), "finance": math.exp(dom_nll)},
        "nll": {"general": gen_nll, "finance": dom_nll},
    }


LISTS = dict(general_tasks=["spear_arc_easy"], domain_tasks=["spear_mmlu_finance"],
             general_corpora=["general"], domain_corpora=["finance"])


def test_compute_retention_on_fixed_numbers():
    base = _results("base", 0.60, 0.30, 2.0, 3.0)
    adapted = _results("adapted", 0.45, 0.40, 2.5, 2.0)
    model = _results("merged", 0.57, 0.38, 2.1, 2.2)
    ret = compute_retention(model, base, adapted, **LISTS)
    assert ret["retention"]["spear_arc_easy"] == pytest.approx(0.95)
    assert ret["retention"]["ppl:general"] == pytest.approx(2.0 / 2.1)
    assert ret["general_retention"] == pytest.approx((0.95 + 2.0 / 2.1) / 2)
    assert ret["entries"]["spear_mmlu_finance"]["gain_preservation"] == pytest.approx(0.8)
    assert ret["entries"]["ppl:finance"]["gain_preservation"] == pytest.approx(0.8)
    assert ret["domain_gain_preservation"] == pytest.approx(0.8)
    assert ret["entries"]["spear_arc_easy"]["gain_preservation"] is None  # general entries have no G
    assert ret["raw"]["adapted"]["nll"]["general"] == 2.5 and ret["models"]["base"] == "base"
    json.dumps(ret, allow_nan=False)
    # the adapted model against itself: G = 1 everywhere, base against itself: G = 0
    assert compute_retention(adapted, base, adapted, **LISTS)["domain_gain_preservation"] == pytest.approx(1.0)
    assert compute_retention(base, base, adapted, **LISTS)["domain_gain_preservation"] == pytest.approx(0.0)
    # without an adapted reference: retention only
    only_base = compute_retention(model, base, None, **LISTS)
    assert only_base["domain_gain_preservation"] is None and only_base["general_retention"] is not None


def test_a_noisy_accuracy_does_not_decide_the_headline(caplog):
    """ARC-Easy at 200 questions (se 0.035 of 0.50) moved 0.50 -> 0.57 by noise while the general NLL got
    worse: the headline follows the NLL; the accuracy keeps its own retention."""
    base, adapted = _results("base", 0.50, 0.30, 3.01, 2.35), _results("adapted", 0.57, 0.40, 3.11, 2.29)
    for res in (base, adapted):
        res["n_samples"] = {"spear_arc_easy": 200}
        res["tasks"]["spear_mmlu_finance"]["acc_stderr"] = 0.003  # a large benchmark: 1% of its score
    ret = compute_retention(adapted, base, adapted, **LISTS, max_relative_stderr=0.02)
    assert ret["general_retention"] == pytest.approx(3.01 / 3.11)  # below 1: without the noisy accuracy
    assert ret["retention"]["spear_arc_easy"] == pytest.approx(0.57 / 0.50)
    assert set(ret["left_out"]) == {"spear_arc_easy"}
    assert ret["left_out"]["spear_arc_easy"] == pytest.approx((0.5 * 0.5 / 200) ** 0.5 / 0.50)  # the larger of the two
    noisy_everywhere = compute_retention(adapted, base, adapted, **LISTS, max_relative_stderr=0.001)
    assert noisy_everywhere["domain_gain_preservation"] == pytest.approx(1.0)  # the domain NLL alone
    # with every general measure noisy the aggregate averages them all, and says so
    only_tasks = {**LISTS, "general_corpora": []}
    with caplog.at_level(logging.WARNING):
        ret = compute_retention(adapted, base, adapted, **only_tasks, max_relative_stderr=0.02)
    assert ret["general_retention"] == pytest.approx(0.57 / 0.50) and "noisier than eval.max_relative_stderr" in caplog.text
    unfiltered = compute_retention(adapted, base, adapted, **LISTS)
    assert unfiltered["general_retention"] == pytest.approx((0.57 / 0.50 + 3.01 / 3.11) / 2) and not unfiltered["left_out"]


def test_compute_retention_zero_domain_gain(caplog):
    base = _results("base", 0.60, 0.30, 2.0, 3.0)
    adapted = _results("adapted", 0.45, 0.30, 2.5, 3.0)  # no domain gain at all
    with caplog.at_level(logging.WARNING):
        ret = compute_retention(_results("m", 0.5, 0.3, 2.2, 2.9), base, adapted, **LISTS)
    assert ret["domain_gain_preservation"] is None
    assert "undefined" in caplog.text


def test_references_from_another_task_set_name_the_missing_tasks():
    model = _results("m", 0.5, 0.3, 2.2, 2.9)
    other = _results("base", 0.6, 0.3, 2.0, 3.0)
    del other["tasks"]["spear_mmlu_finance"]
    del other["nll"]["finance"]
    with pytest.raises(SpearError, match=r"references\.base.*spear_mmlu_finance.*perplexity:finance"):
        compute_retention(model, other, None, **LISTS)


# ----------------------------------------------------------------------------- suites and bad inputs
@pytest.mark.parametrize("suite", ["quick", "general", "finance", "full"])
def test_suites_compose_and_name_known_tasks(compose, suite):
    from spear.evaluation.harness import local_task_names, task_manager

    cfg = compose("evaluate", [f"eval={suite}"])
    assert cfg.task_name == "evaluate" and cfg.references.base is None and cfg.eval.name == suite
    task_manager(cfg.eval.tasks)
    assert set(cfg.eval.tasks) <= set(local_task_names())
    assert set(cfg.eval.general_tasks) | set(cfg.eval.domain_tasks) <= set(cfg.eval.tasks)
    if suite == "quick":
        assert cfg.eval.limits["spear_arc_easy"] >= 200 and cfg.eval.bootstrap_iters == 0


def test_local_tasks_are_declared():
    from spear.evaluation.harness import local_task_names

    names = set(local_task_names())
    expected = {"spear_arc_easy", "spear_arc_challenge", "spear_hellaswag", "spear_boolq", "spear_mmlu_general",
                "spear_mmlu_finance", "spear_mmlu_finance_cloze", "spear_gsm8k", "spear_gsm8k_bpb"}
    assert expected <= names


def test_unknown_task_lists_close_matches():
    from spear.evaluation.harness import task_manager

    with pytest.raises(SpearError, match=r"'spear_arc_esay'.*spear_arc_easy"):
        task_manager(["spear_arc_esay"])
    # standard lm-eval names pass through (lm-eval's own index is scanned only for them)
    assert {"arc_easy", "spear_arc_easy"} <= set(task_manager(["arc_easy", "spear_arc_easy"]).all_tasks)
    with pytest.raises(SpearError, match=r"'arc_esay'.*arc_easy"):
        task_manager(["arc_esay"])


def test_suite_lists_must_name_evaluated_things(compose):
    with pytest.raises(SpearError, match="eval.general_tasks names spear_boolq"):
        compose("evaluate", ["eval=quick", "eval.general_tasks=[spear_boolq]"])


# ----------------------------------------------------------------------------- the entry point (no eval data needed)
def _ppl_only(compose, tiny_llama_dir, corpus, out, extra=()):
    return compose(
        "evaluate",
        [
            "model=tiny_llama", f"model.ref={tiny_llama_dir}", "eval=perplexity",
            f"proxy.general.source='{corpus}'", f"proxy.domain.source='{corpus}'",
            "proxy.general.max_tokens=300", "proxy.domain.max_tokens=200", "proxy.general.name=general",
            "proxy.reported=[]", *extra,
        ],
        output_dir=out,
    )


def test_run_writes_results_and_retention(compose, tiny_llama_dir, tmp_path):
    from spear.evaluation.stage import run_evaluate as run

    corpus = tmp_path / "general.txt"
    corpus.write_text(TEXT)
    first = run(_ppl_only(compose, tiny_llama_dir, corpus, tmp_path / "a"))
    results = json.loads((tmp_path / "a" / "results.json").read_text())
    assert set(results) >= {"model", "tasks", "perplexity", "nll"}
    assert results["tokens"]["general"] == 299 and results["perplexity"]["general"] > 1
    assert (tmp_path / "a" / "results.md").read_text().count("general") >= 1
    assert first["retention"] is None

    second = run(_ppl_only(compose, tiny_llama_dir, corpus, tmp_path / "b", [f"references.base={tmp_path / 'a'}"]))
    ret = json.loads((tmp_path / "b" / "retention.json").read_text())
    assert ret["retention"]["ppl:general"] == pytest.approx(1.0)
    assert ret["general_retention"] == pytest.approx(1.0)
    assert second["retention"]["models"]["base"] == str(tiny_llama_dir)


def test_run_rejects_references_from_another_task_set(compose, tiny_llama_dir, tmp_path):
    from spear.evaluation.stage import run_evaluate as run

    corpus = tmp_path / "general.txt"
    corpus.write_text(TEXT)
    other = tmp_path / "other_results.json"
    other.write_text(json.dumps({"model": "x", "tasks": {"spear_boolq": {"acc": 0.6}}, "perplexity": {"wiki": 20.0},
                                 "nll": {"wiki": 3.0}}))
    with pytest.raises(SpearError, match=r"references\.base.*perplexity:general"):
        run(_ppl_only(compose, tiny_llama_dir, corpus, tmp_path / "c", [f"references.base={other}"]))


def test_run_rejects_missing_corpus(compose, tiny_llama_dir, tmp_path):
    from spear.evaluation.stage import run_evaluate as run

    with pytest.raises(SpearError, match="proxy.general.source"):
        run(_ppl_only(compose, tiny_llama_dir, tmp_path / "nope.txt", tmp_path / "d"))


def test_run_rejects_unknown_task_before_loading_the_model(compose, tmp_path):
    from spear.evaluation.stage import run_evaluate as run

    cfg = compose("evaluate", ["model=tiny_llama", "model.ref=/nonexistent/model", "eval.tasks=[spear_boolk]",
                               "eval.general_tasks=[]"], output_dir=tmp_path / "e")
    with pytest.raises(SpearError, match=r"'spear_boolk'.*spear_boolq"):
        run(cfg)
