"""Sliding-window perplexity of a causal LM on a text corpus.

The text is tokenised once (no special tokens) and cut into windows of ``max_length`` tokens
whose ends advance by ``stride``; each window scores only the tokens it adds, so every token
after the first is predicted exactly once, with at least ``max_length - stride`` tokens of
context (all tokens before it inside the first window). The last window ends at the last token
and keeps the full ``max_length`` (more context, no padding), so all windows of a corpus longer
than ``max_length`` have the same length and batch without padding. Only the logits of scored
positions are computed (``logits_to_keep``), which keeps the vocabulary projection small.

Deterministic, ``torch.no_grad``, float32 log-softmax. The proxy evaluator
(:mod:`spear.evaluation.proxy`) tokenises each corpus once with :func:`tokenize_corpus` and calls
:func:`corpus_nll_from_ids` for every model it measures.
"""

from __future__ import annotations

import inspect
import math
from typing import Any

from spear.errors import SpearError
from spear.models.loading import max_positions


def tokenize_corpus(tokenizer, text: str, max_tokens: int | None = None):
    """The token ids of ``text`` (no special tokens) as a 1-D ``LongTensor``, cut at ``max_tokens``."""
    import torch

    if max_tokens is not None and max_tokens < 2:
        raise SpearError(f"max_tokens={max_tokens} is too small: perplexity needs at least 2 tokens")
    if max_tokens is None:
        ids = tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]
    else:
        # tokenise a growing prefix only; the margin keeps the cut away from the last kept token
        chars = 8 * max_tokens + 256
        while True:
            ids = tokenizer(text[:chars], add_special_tokens=False, verbose=False)["input_ids"]
            if chars >= len(text) or len(ids) >= max_tokens + 64:
                break
            chars *= 2
    ids = torch.as_tensor(ids, dtype=torch.long).reshape(-1)
    return ids[:max_tokens] if max_tokens is not None else ids


def sliding_windows(n_tokens: int, max_length: int, stride: int) -> list[tuple[int, int, int]]:
    """``(begin, end, n_scored)`` windows: ``ids[begin:end]`` scores its last ``n_scored`` tokens.

    Every token ``1..n_tokens-1`` is scored exactly once; token 0 has no context and is not.
    ``stride`` is used up to ``max_length - 1`` (``stride == max_length``, "disjoint windows",
    becomes a one-token overlap, so that no token is scored without context).
    """
    if max_length < 2:
        raise SpearError(f"perplexity max_length={max_length} must be >= 2")
    if not 1 <= stride <= max_length:
        raise SpearError(f"perplexity stride={stride} must be between 1 and max_length={max_length}")
    stride = min(stride, max_length - 1)  # a window needs one token of context for its first scored token
    if n_tokens < 2:
        raise SpearError(f"the text has {n_tokens} token(s): perplexity needs at least 2")
    if n_tokens <= max_length:
        return [(0, n_tokens, n_tokens - 1)]
    windows = [(0, max_length, max_length - 1)]
    prev_end = max_length
    while prev_end < n_tokens:
        end = min(prev_end + stride, n_tokens)
        windows.append((end - max_length, end, end - prev_end))
        prev_end = end
    return windows


def accepts_logits_to_keep(model) -> bool:
    try:
        return "logits_to_keep" in inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return False


def corpus_nll_from_ids(
    model,
    input_ids,
    *,
    max_length: int,
    stride: int,
    batch_size: int,
    progress: bool = False,
) -> dict[str, Any]:
    """Mean NLL per predicted token of a 1-D token tensor: ``{"nll", "ppl", "tokens"}``.

    ``max_length`` is clipped to the model's ``max_position_embeddings``. The model's train/eval
    mode is restored afterwards; inputs go to the model's device.
    """
    import torch

    ids = torch.as_tensor(input_ids, dtype=torch.long).reshape(-1)
    if batch_size < 1:
        raise SpearError(f"perplexity batch_size={batch_size} must be >= 1")
    limit = max_positions(model)
    if limit is not None and max_length > limit:
        max_length = limit
        stride = min(stride, max_length)
    windows = sliding_windows(int(ids.numel()), max_length, stride)

    device = next(model.parameters()).device
    keep_kw = accepts_logits_to_keep(model)
    was_training = model.training
    model.eval()
    total_nll = 0.0
    total_tokens = 0
    # the first window scores (almost) all its tokens, the others only `stride`: batch them apart
    groups = [windows[:1]] + [windows[i : i + batch_size] for i in range(1, len(windows), batch_size)]
    groups = [g for g in groups if g]
    iterator = groups
    if progress:
        from tqdm.auto import tqdm

        iterator = tqdm(groups, desc="perplexity", unit="batch", leave=False)
    try:
        with torch.no_grad():
            for group in iterator:
                batch = torch.stack([ids[b:e] for b, e, _ in group]).to(device)
                length = batch.shape[1]
                keep = max(n for _, _, n in group) + 1  # logits of the positions that predict scored tokens
                kwargs = {"logits_to_keep": keep} if keep_kw else {}
                logits = model(input_ids=batch, use_cache=False, **kwargs).logits
                logits = logits[:, -keep:, :] if logits.shape[1] >= keep else logits
                # logits[:, j] predicts token length - keep + 1 + j
                logprobs = torch.log_softmax(logits[:, :-1].float(), dim=-1)
                targets = batch[:, length - keep + 1 :]
                token_lp = logprobs.gather(-1, targets.unsqueeze(-1)).squeeze(-1)  # (B, keep-1)
                span = token_lp.shape[1]
                positions = torch.arange(span, device=token_lp.device)
                scored = torch.tensor([n for _, _, n in group], device=token_lp.device)
                mask = positions.unsqueeze(0) >= (span - scored).unsqueeze(1)
                total_nll -= float(token_lp.masked_select(mask).double().sum())
                total_tokens += int(scored.sum())
    finally:
        model.train(was_training)
    nll = total_nll / total_tokens
    return {"nll": nll, "ppl": math.exp(nll) if nll < 700 else None, "tokens": total_tokens}
