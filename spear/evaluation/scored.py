"""Scored text: the token stream a proxy measures or calibrates on, with the weight of every predicted token.

Two kinds of corpus feed the proxies. Raw text is one token stream, every token scored. Chat
records (``{question, answer}`` JSONL) are rendered one by one in the tokenizer's chat template
(question as the user turn, answer as the assistant turn; ``Question: ...\\nAnswer: ...`` when the
tokenizer has no template) and only the answer tokens are scored: CPT on raw text moves an instruct
model toward a plain language model, and the NLL of its chat answers is where that shows first.

:class:`ScoredText` holds either as ``ids`` plus ``weights`` (1 where the token is predicted and
counted, 0 elsewhere) and, for chat, each record's span, so that evaluation scores every record on
its own (no other record as context) while calibration (the fitted policy, the gradient impact)
draws windows from the stream and weights their loss.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from spear.errors import SpearError
from spear.evaluation.perplexity import accepts_logits_to_keep

PLAIN_FORMAT = "Question: {question}\nAnswer:"


@dataclass(frozen=True)
class ScoredText:
    """``ids`` (1-D LongTensor), ``weights`` (1-D float, ``weights[i]`` counts the prediction of ``ids[i]``)
    and, for chat records, ``spans``: each record's ``(begin, end)`` in ``ids``."""

    ids: Any
    weights: Any
    spans: tuple[tuple[int, int], ...] | None = None
    keys: tuple[str, ...] = ()  # sha256 of each chat record's question (the overlap check)
    template: str | None = None  # chat: "chat_template" or "plain"

    @property
    def tokens(self) -> int:
        """Scored tokens (a text stream's first token has no context and is not scored)."""
        return int(self.weights[1:].sum()) if self.spans is None else int(self.weights.sum())

    @classmethod
    def of_text(cls, ids) -> ScoredText:
        import torch

        ids = torch.as_tensor(ids, dtype=torch.long).reshape(-1)
        return cls(ids, torch.ones(ids.numel(), dtype=torch.float32))


# ------------------------------------------------------------------------------------- chat records
def question_key(record: dict[str, Any]) -> str:
    return hashlib.sha256(f"{record.get('context') or ''}\n{record['question']}".strip().encode("utf-8")).hexdigest()


def read_chat_records(path: Path, key: str) -> list[dict[str, Any]]:
    """The ``{question, answer[, context, split]}`` records of a JSONL file; a bad line is one error."""
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as err:
        raise SpearError(f"{key}.source={path} is not UTF-8 text (byte {err.start}); convert it to UTF-8") from None
    records = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise SpearError(f"{key}.source={path} line {number} is not JSON ({err.msg}); one object per line") from None
        if not isinstance(record, dict) or not all(isinstance(record.get(f), str) and record[f].strip()
                                                   for f in ("question", "answer")):
            raise SpearError(f"{key}.source={path} line {number} lacks a non-empty 'question' or 'answer'; chat records "
                             "are {question, answer} objects")
        records.append(record)
    if not records:
        raise SpearError(f"{key}.source={path} holds no records; give {{question, answer}} JSONL lines")
    return records


def render(tokenizer, record: dict[str, Any], key: str) -> tuple[list[int], int]:
    """(token ids of the whole exchange, number of prompt tokens before the answer)."""
    user = f"{record.get('context') or ''}\n{record['question']}".strip()
    if getattr(tokenizer, "chat_template", None):
        turn = {"role": "user", "content": user}
        prompt = tokenizer.apply_chat_template([turn], tokenize=False, add_generation_prompt=True)
        full = tokenizer.apply_chat_template([turn, {"role": "assistant", "content": record["answer"]}], tokenize=False)
    else:
        prompt = PLAIN_FORMAT.format(question=user)
        full = f"{prompt} {record['answer']}{tokenizer.eos_token or ''}"
    head = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    ids = tokenizer(full, add_special_tokens=False)["input_ids"]
    if ids[:len(head)] != head or len(ids) <= len(head):
        raise SpearError(f"{key}: the chat template does not render the answer after the prompt; use a tokenizer whose "
                         "template appends the assistant turn, or a text corpus")
    return ids, len(head)


def take_records(tokenizer, records: list[dict[str, Any]], tokens: int | None, key: str) -> ScoredText:
    """Whole records in order until their answers hold ``tokens`` scored tokens (null: all)."""
    import torch

    ids: list[int] = []
    weights: list[float] = []
    spans, keys = [], []
    for record in records:
        if tokens is not None and sum(weights) >= tokens:
            break
        full, n_prompt = render(tokenizer, record, key)
        spans.append((len(ids), len(ids) + len(full)))
        keys.append(question_key(record))
        ids += full
        weights += [0.0] * n_prompt + [1.0] * (len(full) - n_prompt)
    template = "chat_template" if getattr(tokenizer, "chat_template", None) else "plain"
    return ScoredText(torch.tensor(ids, dtype=torch.long), torch.tensor(weights, dtype=torch.float32), tuple(spans),
                      tuple(keys), template)


# ------------------------------------------------------------------------------------------ scoring
def records_nll(model, text: ScoredText, *, batch_size: int) -> dict[str, Any]:
    """Mean NLL per scored token of chat records, each scored on its own: ``{"nll", "ppl", "tokens",
    "stderr", "records"}``. ``stderr`` is the standard error of the ratio mean over records (delta method).

    Records are left-padded into batches with explicit positions, so a batch scores each record
    exactly as alone; only the logits of the answer positions are computed.
    """
    import torch

    device = next(model.parameters()).device
    per_record: list[tuple[float, float]] = []  # (summed NLL, scored tokens)
    order = sorted(range(len(text.spans)), key=lambda i: text.spans[i][1] - text.spans[i][0])
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for start in range(0, len(order), batch_size):
                chunk = [text.spans[i] for i in order[start:start + batch_size]]
                per_record += _score_batch(model, text, chunk, device)
    finally:
        model.train(was_training)
    nll_sums = torch.tensor([s for s, _ in per_record], dtype=torch.float64)
    counts = torch.tensor([c for _, c in per_record], dtype=torch.float64)
    nll = float(nll_sums.sum() / counts.sum())
    m = len(per_record)
    stderr = None
    if m > 1:
        residual = nll_sums - nll * counts
        stderr = float(math.sqrt(float((residual ** 2).sum()) / (m * (m - 1))) / float(counts.mean()))
    return {"nll": nll, "ppl": math.exp(nll) if nll < 700 else None, "tokens": int(counts.sum()), "stderr": stderr,
            "records": m}


def _score_batch(model, text: ScoredText, spans, device) -> list[tuple[float, float]]:
    import torch

    length = max(e - b for b, e in spans)
    pad = 0
    batch = torch.full((len(spans), length), pad, dtype=torch.long)
    mask = torch.zeros((len(spans), length), dtype=torch.long)
    weights = torch.zeros((len(spans), length), dtype=torch.float32)
    for row, (b, e) in enumerate(spans):
        batch[row, length - (e - b):] = text.ids[b:e]
        mask[row, length - (e - b):] = 1
        weights[row, length - (e - b):] = text.weights[b:e]
    positions = (mask.cumsum(1) - 1).clamp(min=0)
    scored_from = int((weights > 0).float().argmax(1).min())  # first answer position of any row
    keep = length - scored_from + 1  # logits of the positions that predict answer tokens
    kwargs = {"logits_to_keep": keep} if accepts_logits_to_keep(model) else {}
    logits = model(input_ids=batch.to(device), attention_mask=mask.to(device), position_ids=positions.to(device),
                   use_cache=False, **kwargs).logits[:, -keep:-1].float()
    targets = batch[:, length - keep + 1:].to(device)
    nll = torch.nn.functional.cross_entropy(logits.flatten(0, 1), targets.flatten(), reduction="none").view(len(spans), -1)
    w = weights[:, length - keep + 1:].to(device)
    return [(float((nll[r] * w[r]).double().sum()), float(w[r].sum())) for r in range(len(spans))]
