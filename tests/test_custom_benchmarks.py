"""eval.custom: your own benchmarks from JSONL/CSV/text files, end to end on tiny_llama."""

from __future__ import annotations

import json
import random

import pytest

from spear.errors import SpearError


def _entry(**values):
    from spear.config.schema import CustomTask

    return CustomTask(**values)


def _proxy():
    from spear.config.schema import CorpusConfig, ProxyConfig

    return ProxyConfig(general=CorpusConfig(name="general", max_tokens=64), reported=[], domain=CorpusConfig(name="domain", source="finance_heldout",
                                                                                 max_tokens=64), max_length=64, stride=64)


def _evaluate(model, tokenizer, *custom, **suite):
    from spear.config.schema import EvalConfig
    from spear.evaluation.harness import evaluate_model

    cfg = EvalConfig(name="custom", custom=list(custom), batch_size=8, max_length=256, **suite)
    return evaluate_model(model, tokenizer, cfg, _proxy(), "tiny", progress=False)


@pytest.fixture(scope="module")
def tiny():
    from spear.models.tiny import build_tiny

    return build_tiny("tiny_llama")


def _mc_file(path, forced: bool, n: int = 40):
    """Questions whose right answer is the one short choice (forced: any model's log-likelihood prefers
    it), or four choices of one length at random positions (a random model is near chance)."""
    rng = random.Random(0)
    lines = []
    for i in range(n):
        if forced:
            choices = ["a", *("".join(rng.choice("qxzjkvw") for _ in range(40)) for _ in range(3))]
        else:
            choices = ["".join(rng.choice("abcdefgh") for _ in range(6)) for _ in range(4)]
        order = list(range(4))
        rng.shuffle(order)
        lines.append(json.dumps({"question": f"question {i}?", "choices": [choices[j] for j in order],
                                 "answer": order.index(0)}))
    path.write_text("\n".join(lines) + "\n")
    return path


def test_multiple_choice_from_jsonl_and_csv(tiny, tmp_path):
    from spear.io.hashing import file_sha256

    model, tokenizer = tiny
    forced = _mc_file(tmp_path / "forced.jsonl", forced=True)
    shuffled = _mc_file(tmp_path / "shuffled.jsonl", forced=False)
    csv = tmp_path / "letters.csv"
    csv.write_text("question,A,B,C,answer\nfirst?,a,qxzjkvwqxzjkvwqxzjkvw,zzzzzzzzzzzzzzzzzzzz,A\n"
                   "second?,qqqqqqqqqqqqqqqqqqqq,a,wwwwwwwwwwwwwwwwwwwww,B\n")
    results = _evaluate(model, tokenizer, _entry(name="forced", path=str(forced)),
                        _entry(name="shuffled", path=str(shuffled), role="general"), _entry(name="letters", path=str(csv)))
    assert results["tasks"]["forced"]["acc"] == 1.0 and results["tasks"]["letters"]["acc"] == 1.0
    assert 0.05 < results["tasks"]["shuffled"]["acc"] < 0.6
    assert results["primary_metric"]["forced"] == "acc" and results["n_samples"]["forced"] == 40
    assert results["custom"]["forced"]["sha256"] == file_sha256(forced)
    assert results["custom"]["shuffled"] == {**results["custom"]["shuffled"], "kind": "multiple_choice", "role": "general",
                                             "records": 40}


def test_generate_scores_exact_match_after_normalisation(tiny, tmp_path):
    """Gold answers that are the model's own greedy continuation (in another case, with punctuation) score 1.0."""
    import torch

    model, tokenizer = tiny
    questions = [f"what is item {i}" for i in range(4)]
    golds = []
    for q in questions:
        ids = torch.tensor([tokenizer(f"Question: {q}\nAnswer:", add_special_tokens=False)["input_ids"]])
        out = model.generate(ids, max_new_tokens=6, do_sample=False, pad_token_id=tokenizer.pad_token_id or 0)
        text = tokenizer.decode(out[0, ids.shape[1]:]).split("\n")[0].strip()
        golds.append(f"  {text.upper()}. ")
    right, wrong = tmp_path / "right.jsonl", tmp_path / "wrong.jsonl"
    right.write_text("".join(json.dumps({"question": q, "answer": g}) + "\n" for q, g in zip(questions, golds, strict=True)))
    wrong.write_text("".join(json.dumps({"question": q, "answer": "surely not this"}) + "\n" for q in questions))
    results = _evaluate(model, tokenizer, _entry(name="right", path=str(right), kind="generate", max_new_tokens=6),
                        _entry(name="wrong", path=str(wrong), kind="generate", max_new_tokens=6))
    assert results["primary_metric"]["right"] == "exact_match,normalised"
    assert results["tasks"]["right"]["exact_match,normalised"] == 1.0
    assert results["tasks"]["wrong"]["exact_match,normalised"] == 0.0


def test_perplexity_benchmark_enters_retention_by_role(tiny, tmp_path):
    from spear.config.schema import EvalConfig
    from spear.evaluation.retention import retention_from_suite

    model, tokenizer = tiny
    docs = tmp_path / "memos.txt"
    docs.write_text("The quarterly accrual was reversed after the audit. " * 40)
    results = _evaluate(model, tokenizer, _entry(name="memos", path=str(docs), kind="perplexity"))
    assert results["nll"]["memos"] > 0 and results["tokens"]["memos"] > 100
    cfg = EvalConfig(custom=[_entry(name="memos", path=str(docs), kind="perplexity")])
    better = {**results, "nll": {**results["nll"], "memos": results["nll"]["memos"] - 0.5}}
    retention = retention_from_suite(better, results, better, cfg, _proxy())
    assert retention["entries"]["ppl:memos"]["kind"] == "domain"
    assert retention["entries"]["ppl:memos"]["gain_preservation"] == pytest.approx(1.0)


@pytest.mark.parametrize(("text", "suffix", "kind", "match"), [
    ('{"question": "q?", "choices": ["a", "b"]}\n', ".jsonl", "multiple_choice", "line 1: field 'answer' is missing"),
    ('{"question": "q?", "choices": ["a", "b"], "answer": 0}\n{"question": "r?", "choices": ["a", "b"], "answer": 2}\n',
     ".jsonl", "multiple_choice", "line 2: field 'answer' is 2, out of range for 2 choices"),
    ('{"question": "q?", "choices": ["a"], "answer": 0}\n', ".jsonl", "multiple_choice", "has 1 choice.*at least 2"),
    ("question,A,B,answer\nq?,x,y,E\n", ".csv", "multiple_choice", "line 2: field 'answer' is 4, out of range"),
    ('{"question": "q?"}\n', ".jsonl", "generate", "line 1: field 'answer' is missing"),
    ("[1, 2]\n", ".jsonl", "generate", "line 1 is a JSON list"),
    ("   \n", ".jsonl", "generate", "is empty"),
    (b"\xff\xfe caf\xe9", ".txt", "perplexity", "is not UTF-8"),
])
def test_a_bad_file_is_one_line_naming_the_line_and_the_field(tmp_path, text, suffix, kind, match):
    from spear.evaluation.custom import load_docs

    path = tmp_path / f"bench{suffix}"
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    with pytest.raises(SpearError, match=match) as err:
        load_docs(_entry(name="bench", path=str(path), kind=kind))
    assert "\n" not in str(err.value) and str(path) in str(err.value)


def test_names_must_not_clash():
    from spear.config.schema import EvalConfig
    from spear.config.store import validate_node

    with pytest.raises(SpearError, match="the name 'spear_arc_easy' is used twice"):
        validate_node(EvalConfig, {"tasks": ["spear_arc_easy"], "custom": [{"name": "spear_arc_easy", "path": "x.jsonl"}]},
                      "eval")


def _pack_files(tmp_path):
    """Small files in each benchmark's published format."""
    fpb = tmp_path / "Sentences_AllAgree.txt"
    fpb.write_bytes("Operating profit rose to EUR 13.1 mn .@positive\nThe company's net sales fell by 5 % .@negative\n"
                    "Nokia is a Finnish company .@neutral\nL\u00e4nnen Tehtaat stayed flat .@neutral\n".encode("iso-8859-1"))
    fiqa = tmp_path / "task1_headline_ABSA_train.json"
    fiqa.write_text(json.dumps({
        "1": {"sentence": "Shares jump after record earnings", "info": [{"sentiment_score": "0.62", "target": "X"}]},
        "2": {"sentence": "Profit warning sinks stock", "info": [{"sentiment_score": "-0.55", "target": "Y"}]},
        "3": {"sentence": "Board meets on Tuesday", "info": [{"sentiment_score": "0.02", "target": "Z"}]}}))
    headline = tmp_path / "gold_headlines.csv"
    headline.write_text("News,Price or Not,Direction Up,Direction Down\n\"gold rises 1% on weak dollar\",1,1,0\n"
                        "\"gold market closed for holiday\",0,0,0\n")
    finqa = tmp_path / "test.json"
    finqa.write_text(json.dumps([{"pre_text": ["revenue was 120 in 2019 ."], "post_text": [], "table": [["year", "2019"]],
                                  "qa": {"question": "what was the revenue?", "exe_ans": 120.0}}]))
    return {"fpb": fpb, "fiqa_sa": fiqa, "headline": headline, "finqa": finqa}


def test_the_finance_pack_reads_the_published_formats(tmp_path):
    from spear.config.schema import EvalConfig
    from spear.evaluation.custom import describe, load_docs

    files = _pack_files(tmp_path)
    cfg = EvalConfig(finance_pack={k: str(v) for k, v in files.items()})
    entries = {e.name: e for e in cfg.own_benchmarks()}
    assert set(entries) == set(files) and all(e.role == "domain" for e in entries.values())
    fpb = load_docs(entries["fpb"])
    assert [d["answer"] for d in fpb] == [2, 0, 1, 1] and "Länn" in fpb[3]["question"]  # ISO-8859-1 as published
    assert [d["answer"] for d in load_docs(entries["fiqa_sa"])] == [2, 0, 1]
    headlines = load_docs(entries["headline"])
    assert len(headlines) == 6 and [d["answer"] for d in headlines] == [1, 1, 0, 0, 0, 0]
    finqa = load_docs(entries["finqa"])
    assert finqa == [{"question": "what was the revenue?", "context": "revenue was 120 in 2019 .\nyear | 2019", "answer": "120"}]
    info = describe(entries["fpb"])
    assert info["non_commercial"] is True and "CC BY-NC-SA" in info["licence"] and info["kind"] == "multiple_choice"
    assert describe(entries["finqa"])["kind"] == "generate"


def test_a_finance_pack_task_runs_end_to_end_and_warns_of_its_licence(tiny, tmp_path, caplog):
    from spear.config.schema import EvalConfig
    from spear.evaluation.harness import evaluate_model

    model, tokenizer = tiny
    files = _pack_files(tmp_path)
    cfg = EvalConfig(name="pack", batch_size=8, max_length=256, finance_pack={"fpb": str(files["fpb"])})
    with caplog.at_level("WARNING"):
        results = evaluate_model(model, tokenizer, cfg, _proxy(), "tiny", progress=False)
    assert results["n_samples"]["fpb"] == 4 and 0.0 <= results["tasks"]["fpb"]["acc"] <= 1.0
    assert results["custom"]["fpb"]["licence"].startswith("CC BY-NC-SA")
    assert any("non-commercial use only" in r.getMessage() for r in caplog.records)


def test_a_malformed_published_file_names_its_line(tmp_path):
    from spear.evaluation.custom import load_docs

    bad = tmp_path / "Sentences_50Agree.txt"
    bad.write_text("fine sentence .@positive\nno label here\n")
    with pytest.raises(SpearError, match="line 2: not `sentence@label`"):
        load_docs(_entry(name="fpb", path=str(bad), format="fpb"))


def test_spear_evaluate_takes_custom_benchmarks_into_retention(compose, tiny_llama_dir, tmp_path):
    from spear.evaluation.stage import run_evaluate

    forced = _mc_file(tmp_path / "forced.jsonl", forced=True, n=8)
    memos = tmp_path / "memos.txt"
    memos.write_text("The quarterly accrual was reversed after the audit. " * 30)
    custom = (f"eval.custom=[{{name: forced, path: {forced}}}, "
              f"{{name: memos, path: {memos}, kind: perplexity, role: general}}]")
    cfg = compose("evaluate", ["model=tiny_llama", f"model.ref={tiny_llama_dir}", f"references.base={tiny_llama_dir}",
                               "eval=perplexity", custom, "proxy.general.max_tokens=128", "proxy.domain.max_tokens=128",
                               "progress=false"], output_dir=tmp_path / "run")
    out = run_evaluate(cfg)
    retention = json.loads((tmp_path / "run" / "retention.json").read_text())
    assert out["results"]["tasks"]["forced"]["acc"] == 1.0
    assert retention["entries"]["forced"]["kind"] == "domain" and retention["entries"]["ppl:memos"]["kind"] == "general"
    assert retention["entries"]["ppl:memos"]["retention"] == pytest.approx(1.0)  # the model is its own base


def test_chat_nll_scores_the_answer_tokens_of_the_assistant_turn(tmp_path):
    """The NLL of the gold answers as assistant turns, token for token what a direct forward pass gives."""
    import torch

    from spear.evaluation.custom import chat_answer_nll
    from spear.models.tiny import build_tiny

    model, tokenizer = build_tiny("tiny_llama")
    path = tmp_path / "chat.jsonl"
    rows = [{"question": "What is an accrual?", "answer": "Revenue or cost booked before cash moves."},
            {"question": "What is a ledger?", "answer": "The book of accounts."}]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    entry = _entry(name="chat", path=str(path), kind="chat_nll", role="general")
    with pytest.raises(SpearError, match="kind=chat_nll but the tokenizer has no chat template"):
        chat_answer_nll(model, tokenizer, entry)
    tokenizer.chat_template = ("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
                               "{% if add_generation_prompt %}<|assistant|>{% endif %}")
    value = chat_answer_nll(model, tokenizer, entry)
    total, count = 0.0, 0
    with torch.no_grad():
        for row in rows:
            head = tokenizer(f"<|user|>{row['question']}\n<|assistant|>", add_special_tokens=False)["input_ids"]
            answer = tokenizer(f"{row['answer']}\n", add_special_tokens=False)["input_ids"]
            ids = torch.tensor([head + answer])
            logits = model(input_ids=ids).logits[0, len(head) - 1:-1]
            total += float(torch.nn.functional.cross_entropy(logits, ids[0, len(head):], reduction="sum"))
            count += len(answer)
    assert value["tokens"] == count and value["nll"] == pytest.approx(total / count, rel=1e-5)


def test_a_published_json_file_of_the_wrong_shape_says_which_format_it_needs(tmp_path):
    from spear.evaluation.custom import load_docs

    fiqa = tmp_path / "task1.json"
    fiqa.write_text("[1, 2]")
    with pytest.raises(SpearError, match="top level is a JSON list, not the dict of FiQA task 1's JSON file"):
        load_docs(_entry(name="fiqa_sa", path=str(fiqa), format="fiqa_sa"))
    finqa = tmp_path / "test.json"
    finqa.write_text('{"qa": 1')
    with pytest.raises(SpearError, match="test.json line 1 is not JSON .*give a FinQA split file"):
        load_docs(_entry(name="finqa", path=str(finqa), format="finqa"))


def test_a_file_is_parsed_once_per_version(tmp_path, monkeypatch):
    """An evaluation checks, describes, writes and scores a benchmark: one parse, until the file changes."""
    from spear.evaluation import custom

    path = _mc_file(tmp_path / "mc.jsonl", forced=True, n=4)
    calls = []
    parse = custom._parse_docs
    monkeypatch.setattr(custom, "_parse_docs", lambda entry: calls.append(entry.name) or parse(entry))
    custom._cached_docs.cache_clear()
    entry = _entry(name="mine", path=str(path), kind="multiple_choice")
    first = custom.load_docs(entry)
    assert custom.load_docs(entry) == first and custom.describe(entry)["records"] == 4 and len(calls) == 1
    _mc_file(path, forced=True, n=5)  # edited: parsed again
    assert len(custom.load_docs(entry)) == 5 and len(calls) == 2
