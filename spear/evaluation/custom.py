"""Your own benchmark from a file (``eval.custom``): no lm-eval YAML to write.

An entry ``{name, path, kind, role}`` names a JSONL or CSV file:

* ``multiple_choice``: ``question``, ``choices`` (a list; in CSV a JSON list, or columns ``A``, ``B``, ...),
  ``answer`` (0-based index or letter), optional ``context``. Scored like ARC: ``acc`` and ``acc_norm``.
* ``generate``: ``question``, ``answer`` (the gold text), optional ``context``. Greedy generation of at
  most ``max_new_tokens`` up to the first newline; ``exact_match`` after normalisation (case,
  punctuation and surrounding whitespace ignored).
* ``perplexity``: documents (a ``.txt`` file, or records with a ``text`` field), scored like the proxy
  corpora: mean NLL per token with the ``proxy`` windows.
* ``chat_nll``: ``question``, ``answer``; the mean NLL per token of each gold answer as the assistant
  turn after the question as the user turn, in the tokenizer's chat template. CPT on raw text is known
  to damage an instruct model's chat behaviour first: with ``role=general`` this measures it.

``format`` reads a public finance benchmark in its published file format instead (the data stays
the user's copy; each carries its licence into results.json, and a non-commercial one is printed):
``fpb`` (Financial PhraseBank ``sentence@label`` lines), ``fiqa_sa`` (FiQA 2018 task 1 JSON; the
sentiment score binned at +-0.1), ``headline`` (the gold commodity news CSV: one yes/no question per
labelled dimension) and ``finqa`` (FinQA JSON: generation of the executed answer). See
:data:`FORMATS`.

Every record is checked before anything runs: a bad file is one line naming the file, the line and
the field. Accuracy kinds become lm-eval tasks generated into a temporary include path (the records,
normalised, as a JSONL file next to their YAML); the results record each file's sha256, and ``role``
(general or domain) puts the entry into general retention or domain-gain preservation like a
built-in task.
"""

from __future__ import annotations

import csv
import json
import string
from functools import lru_cache
from pathlib import Path
from typing import Any

from spear.errors import SpearError
from spear.io.hashing import file_sha256

LETTERS = string.ascii_uppercase
ACCURACY_KINDS = ("multiple_choice", "generate")


def _where(entry, line: int | None = None) -> str:
    return f"eval.custom {entry.name!r}: {entry.path}" + (f" line {line}" if line is not None else "")


def _path_key(entry) -> str:
    """The config key that set the file: a finance-pack entry is named after its format."""
    return f"eval.finance_pack.{entry.format}" if entry.format != "spear" and entry.name == entry.format else "eval.custom[].path"


def _check_file(entry) -> Path:
    path = Path(entry.path).expanduser()
    if not path.is_file():
        raise SpearError(f"{_where(entry)} is not a file; fix {_path_key(entry)}")
    return path


def _text_of(entry) -> str:
    path = _check_file(entry)
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise SpearError(f"{_where(entry)} is not UTF-8 text (byte {err.start}); convert it to UTF-8") from None
    if not text.strip():
        raise SpearError(f"{_where(entry)} is empty; give it one record per line")
    return text


def read_records(entry) -> list[tuple[int, dict[str, Any]]]:
    """``[(line number, record)]`` of a JSONL or CSV file (a ``.txt`` perplexity file: one record ``text``)."""
    text = _text_of(entry)
    suffix = Path(entry.path).suffix.lower()
    if suffix == ".txt":
        return [(1, {"text": text})]
    if suffix == ".csv":
        reader = csv.DictReader(text.splitlines())
        return [(i + 2, {k: v for k, v in row.items() if k is not None}) for i, row in enumerate(reader)]
    records = []
    for i, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise SpearError(f"{_where(entry, i)} is not JSON ({err.msg}); one JSON object per line") from None
        if not isinstance(record, dict):
            raise SpearError(f"{_where(entry, i)} is a JSON {type(record).__name__}, not an object with named fields")
        records.append((i, record))
    return records


def _field(entry, line: int, record: dict[str, Any], key: str) -> Any:
    value = record.get(key)
    if value is None or (isinstance(value, str) and not value.strip()):
        raise SpearError(f"{_where(entry, line)}: field {key!r} is missing or empty; every record needs "
                         + ", ".join(REQUIRED[kind_of(entry)]))
    return value


def _choices(entry, line: int, record: dict[str, Any]) -> list[str]:
    value = record.get("choices")
    if value is None:  # CSV columns A, B, C, ...
        value = [record[c] for c in LETTERS if record.get(c) not in (None, "")]
        if not value:
            _field(entry, line, record, "choices")
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError:
            raise SpearError(f"{_where(entry, line)}: field 'choices' is not a JSON list (in CSV: '[\"a\", \"b\"]' or columns "
                             "A, B, ...)") from None
    if not isinstance(value, list) or any(not isinstance(c, str | int | float) for c in value):
        raise SpearError(f"{_where(entry, line)}: field 'choices' must be a list of texts")
    if len(value) < 2:
        raise SpearError(f"{_where(entry, line)}: field 'choices' has {len(value)} choice(s); a question needs at least 2")
    return [str(c) for c in value]


def _answer_index(entry, line: int, answer: Any, n: int) -> int:
    if isinstance(answer, str) and answer.strip().isdigit():
        answer = int(answer.strip())
    if isinstance(answer, str) and len(answer.strip()) == 1 and answer.strip().upper() in LETTERS:
        answer = LETTERS.index(answer.strip().upper())
    if isinstance(answer, bool) or not isinstance(answer, int):
        raise SpearError(f"{_where(entry, line)}: field 'answer' is {answer!r}; give a 0-based index or a letter")
    if not 0 <= answer < n:
        raise SpearError(f"{_where(entry, line)}: field 'answer' is {answer}, out of range for {n} choices "
                         f"(0..{n - 1} or A..{LETTERS[n - 1]})")
    return answer


REQUIRED = {"multiple_choice": ("question", "choices", "answer"), "generate": ("question", "answer"),
            "perplexity": ("text",), "chat_nll": ("question", "answer")}
NLL_KINDS = ("perplexity", "chat_nll")  # scored by spear (results.json "nll"), not by lm-eval



# ---------------------------------------------------------------------- published finance formats
SENTIMENTS = ["negative", "neutral", "positive"]
HEADLINE_QUESTIONS = {  # column of the gold news CSV -> the question asked of each headline
    "Price or Not": "Does the news headline talk about price?",
    "Direction Up": "Does the news headline talk about price going up?",
    "Direction Down": "Does the news headline talk about price going down?",
    "Direction Constant": "Does the news headline talk about price staying constant?",
    "Past Price": "Does the news headline talk about a price in the past?",
    "Future Price": "Does the news headline talk about a price in the future?",
    "Asset Comparision": "Does the news headline compare gold with any other asset?",
}


def _fpb(entry) -> list[tuple[int, dict[str, Any]]]:
    raw = Path(entry.path).expanduser().read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        text = raw.decode("iso-8859-1")  # the encoding Financial PhraseBank is published in
    out = []
    for i, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        sentence, sep, label = line.rpartition("@")
        if not sep or label.strip() not in SENTIMENTS:
            raise SpearError(f"{_where(entry, i)}: not `sentence@label` with label {'/'.join(SENTIMENTS)}")
        out.append((i, {"question": f"What is the sentiment of this financial news sentence? {sentence.strip()}",
                        "choices": SENTIMENTS, "answer": SENTIMENTS.index(label.strip())}))
    return out


def _json_file(entry, top: type, what: str) -> Any:
    """A published benchmark's JSON document, whose top level must be a ``top`` (``what`` names the format)."""
    try:
        data = json.loads(_text_of(entry))
    except json.JSONDecodeError as err:
        raise SpearError(f"{_where(entry, err.lineno)} is not JSON ({err.msg}); give {what}") from None
    if not isinstance(data, top):
        raise SpearError(f"{_where(entry)}: the top level is a JSON {type(data).__name__}, not the {top.__name__} of {what}")
    return data


def _fiqa_sa(entry) -> list[tuple[int, dict[str, Any]]]:
    data = _json_file(entry, dict, "FiQA task 1's JSON file (id -> record)")
    out = []
    for n, (key, item) in enumerate(data.items(), start=1):
        info = (item or {}).get("info") if isinstance(item, dict) else None
        try:
            sentence, score = item["sentence"], float(info[0]["sentiment_score"])
        except (KeyError, IndexError, TypeError, ValueError):
            raise SpearError(f"{_where(entry)} record {key!r}: needs `sentence` and `info[0].sentiment_score`") from None
        label = 0 if score < -0.1 else 2 if score > 0.1 else 1
        out.append((n, {"question": f"What is the sentiment of this financial text? {sentence}", "choices": SENTIMENTS,
                        "answer": label}))
    return out


def _headline(entry) -> list[tuple[int, dict[str, Any]]]:
    rows = read_records(entry)
    out = []
    for line, row in rows:
        news = str(row.get("News") or "").strip()
        if not news:
            raise SpearError(f"{_where(entry, line)}: field 'News' is missing or empty (the gold news CSV format)")
        for column, question in HEADLINE_QUESTIONS.items():
            value = str(row.get(column) or "").strip()
            if value in ("0", "1"):
                out.append((line, {"question": f"{question} Headline: {news}", "choices": ["No", "Yes"], "answer": int(value)}))
    if not out:
        raise SpearError(f"{_where(entry)} has no 0/1 label in any of {', '.join(HEADLINE_QUESTIONS)}")
    return out


def _finqa(entry) -> list[tuple[int, dict[str, Any]]]:
    data = _json_file(entry, list, "a FinQA split file (a list of examples)")
    out = []
    for n, item in enumerate(data, start=1):
        try:
            qa, table = item["qa"], item.get("table") or []
            context = "\n".join([*item.get("pre_text", []), *(" | ".join(map(str, r)) for r in table), *item.get("post_text", [])])
            answer = qa["exe_ans"]
            question = qa["question"]
        except (KeyError, TypeError):
            raise SpearError(f"{_where(entry)} example {n}: needs `qa.question` and `qa.exe_ans`") from None
        if isinstance(answer, float):
            answer = f"{answer:.2f}".rstrip("0").rstrip(".")
        out.append((n, {"question": question, "answer": str(answer), "context": context}))
    return out


# format -> (reader, kind, licence, non-commercial)
FORMATS: dict[str, tuple[Any, str, str, bool]] = {
    "fpb": (_fpb, "multiple_choice", "CC BY-NC-SA 3.0 (Malo et al., Financial PhraseBank)", True),
    "fiqa_sa": (_fiqa_sa, "multiple_choice", "not stated by the FiQA 2018 release (mirrors say CC BY-SA 4.0 or MIT): "
                "check the terms of your copy", False),
    "headline": (_headline, "multiple_choice", "as published with Sinha & Khandait (2021): check the terms of your copy",
                 False),
    "finqa": (_finqa, "generate", "MIT (Chen et al., FinQA)", False),
}


def kind_of(entry) -> str:
    """The entry's kind: its published format's, else its own ``kind``."""
    return FORMATS[entry.format][1] if entry.format in FORMATS else entry.kind


def load_docs(entry) -> list[dict[str, Any]]:
    """The checked, normalised records of a custom benchmark (see the module docstring), parsed once
    per version of the file: an evaluation checks, describes, writes and scores them (read-only)."""
    path = Path(entry.path).expanduser()
    if not path.is_file():
        return _parse_docs(entry)  # its one-line error
    stat = path.stat()
    return list(_cached_docs(entry.model_dump_json(), str(path.resolve()), stat.st_mtime_ns, stat.st_size))


@lru_cache(maxsize=8)
def _cached_docs(entry_json: str, path: str, mtime_ns: int, size: int) -> tuple[dict[str, Any], ...]:
    from spear.config.schema import CustomTask

    return tuple(_parse_docs(CustomTask.model_validate_json(entry_json)))


def _parse_docs(entry) -> list[dict[str, Any]]:
    _check_file(entry)  # every format's reader starts from a readable file
    docs = []
    kind = kind_of(entry)
    records = FORMATS[entry.format][0](entry) if entry.format in FORMATS else read_records(entry)
    for line, record in records:
        if kind == "perplexity":
            docs.append({"text": str(_field(entry, line, record, "text"))})
            continue
        doc = {"question": str(_field(entry, line, record, "question")).strip(),
               "context": str(record.get("context") or "").strip()}
        if kind == "multiple_choice":
            doc["choices"] = _choices(entry, line, record)
            doc["answer"] = _answer_index(entry, line, _field(entry, line, record, "answer"), len(doc["choices"]))
        else:
            doc["answer"] = str(_field(entry, line, record, "answer")).strip()
        docs.append(doc)
    if not docs:
        raise SpearError(f"{_where(entry)} holds no records")
    return docs


def describe(entry) -> dict[str, Any]:
    """What results.json records of an entry: file, sha256, kind, format and licence, role, number of records."""
    info = {"path": str(Path(entry.path).expanduser().resolve()), "sha256": file_sha256(Path(entry.path).expanduser()),
            "kind": kind_of(entry), "role": entry.role, "records": len(load_docs(entry))}
    if entry.format in FORMATS:
        _, _, licence, non_commercial = FORMATS[entry.format]
        info.update(format=entry.format, licence=licence, non_commercial=non_commercial)
    return info


# ------------------------------------------------------------------------------ lm-eval tasks
_PROMPT = "{% if context %}{{context}}\n{% endif %}Question: {{question}}\nAnswer:"
_LOADER = '''"""Generated by spear-mm: the records of a custom benchmark, in memory (no datasets cache)."""
import json


def load(path, **_):
    from datasets import Dataset

    with open(path, encoding="utf-8") as fh:
        return {"test": Dataset.from_list([json.loads(line) for line in fh])}
'''


def task_config(entry, data_file: Path) -> dict[str, Any]:
    """The lm-eval task config of an accuracy entry (its records in ``data_file``)."""
    common = {"task": entry.name, "custom_dataset": "!function spear_custom.load",
              "dataset_kwargs": {"path": str(data_file)}, "test_split": "test", "doc_to_text": _PROMPT,
              "metadata": {"version": 1.0, "spear_custom": True}}
    if kind_of(entry) == "multiple_choice":
        return {**common, "output_type": "multiple_choice", "doc_to_target": "{{answer}}", "doc_to_choice": "{{choices}}",
                "metric_list": [{"metric": "acc", "aggregation": "mean", "higher_is_better": True},
                                {"metric": "acc_norm", "aggregation": "mean", "higher_is_better": True}]}
    return {**common, "output_type": "generate_until", "doc_to_target": "{{answer}}", "target_delimiter": "",
            "generation_kwargs": {"until": ["\n"], "max_gen_toks": entry.max_new_tokens, "do_sample": False},
            "filter_list": [{"name": "normalised", "filter": [{"function": "remove_whitespace"}, {"function": "take_first"}]}],
            "metric_list": [{"metric": "exact_match", "aggregation": "mean", "higher_is_better": True,
                             "ignore_case": True, "ignore_punctuation": True, "regexes_to_ignore": [r"^\s+", r"\s+$"]}]}


def write_tasks(entries, folder: Path) -> list[str]:
    """Write the accuracy entries' lm-eval tasks into ``folder`` (an include path); their names."""
    import yaml

    folder = Path(folder)
    (folder / "spear_custom.py").write_text(_LOADER, encoding="utf-8")
    names = []
    for entry in entries:
        if kind_of(entry) not in ACCURACY_KINDS:
            continue
        data = folder / f"{entry.name}.jsonl"
        data.write_text("".join(json.dumps(d, ensure_ascii=False) + "\n" for d in load_docs(entry)), encoding="utf-8")
        text = yaml.safe_dump(task_config(entry, data), sort_keys=False, allow_unicode=True)
        text = text.replace("'!function spear_custom.load'", "!function spear_custom.load")
        (folder / f"{entry.name}.yaml").write_text(text, encoding="utf-8")
        names.append(entry.name)
    return names


def chat_answer_nll(model, tokenizer, entry) -> dict[str, Any]:
    """Mean NLL per answer token of the gold answers as assistant turns (``kind=chat_nll``)."""
    import math

    import torch

    if not getattr(tokenizer, "chat_template", None):
        raise SpearError(f"eval.custom {entry.name!r} is kind=chat_nll but the tokenizer has no chat template; use a "
                         "chat model's tokenizer or kind=generate")
    device = next(model.parameters()).device
    total, count = 0.0, 0
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for doc in load_docs(entry):
                user = {"role": "user", "content": f"{doc['context']}\n{doc['question']}".strip()}
                prompt = tokenizer.apply_chat_template([user], tokenize=False, add_generation_prompt=True)
                full = tokenizer.apply_chat_template([user, {"role": "assistant", "content": doc["answer"]}], tokenize=False)
                head = tokenizer(prompt, add_special_tokens=False)["input_ids"]
                ids = tokenizer(full, add_special_tokens=False)["input_ids"]
                if ids[:len(head)] != head or len(ids) <= len(head):
                    raise SpearError(f"eval.custom {entry.name!r}: the chat template does not render the answer after "
                                     "the prompt; kind=chat_nll needs a template that appends the assistant turn")
                x = torch.tensor([ids], device=device)
                logits = model(input_ids=x, use_cache=False).logits[0, len(head) - 1:-1].float()
                total += float(torch.nn.functional.cross_entropy(logits, x[0, len(head):], reduction="sum"))
                count += len(ids) - len(head)
    finally:
        model.train(was_training)
    nll = total / count
    if not math.isfinite(nll):
        raise SpearError(f"the model gives a non-finite NLL on eval.custom {entry.name!r}; check its weights")
    return {"nll": nll, "ppl": math.exp(nll), "tokens": count}
