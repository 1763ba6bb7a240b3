"""Evaluation throughput: spear's perplexity and lm-eval loglikelihood paths vs a plain batched forward pass.

Same process, same model (the embedded SmolLM2-135M; ``--tiny`` for tiny_llama), float32, no grad:

- ``perplexity``: :func:`spear.evaluation.perplexity.corpus_nll_from_ids` on the general proxy
  corpus (``--tokens`` tokens, the proxy's 512-token windows with stride 256, batch 4), against
  ``plain``: the model's forward on the same window batches, nothing else (full logits, no scoring).
- ``lm_eval``: :func:`spear.evaluation.harness.run_lm_eval` on ARC-Easy (``--questions`` questions,
  4 choices each: lm-eval's loglikelihood requests), against ``replay``: the exact input batches
  lm-eval sent to the model (captured on the first run), forwarded again with nothing around them.
  The gap is lm-eval's own work: building and sorting requests, tokenising, log-softmax, collation.

Tokens are the tokens forwarded (padding included, the same for a path and its baseline), so the
ratio is a time ratio. Each repeat is a pair, path and baseline back to back (alternating which goes
first): the machine's speed moves by 20-30% between repeats on this project's shared 2-core VM, less
within a pair. After ``--pilot-pairs`` pairs, pairs go on until their spread says the 95% interval of
the mean ratio is within ±2.5% (``roofline.enough_pairs``, within ``--max-s``); min / median / max
are reported, and the per-pair ratio decides whether the run resolves 5%. MFU = tokens/s x
forward model FLOPs per token / the attainable matmul FLOP/s at the batch's GEMM shapes
(``roofline.py``). Target (recorded, not asserted): each path
>= 0.8x its baseline. The last line is the JSON object.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import sys
import time
import warnings
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
from roofline import enough_pairs, forward_flops_per_token, machine_load, matmul_roofline, spread  # noqa: E402

from spear.errors import SpearError  # noqa: E402

TARGET = 0.8


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


class ForwardRecorder:
    """Wraps ``model.forward`` to keep a copy of every input batch it is given (lm-eval's requests)."""

    def __init__(self, model) -> None:
        self.model, self.batches = model, []
        self._forward = model.forward

    def __enter__(self) -> ForwardRecorder:
        def recording(*args, **kwargs):
            ids = kwargs.get("input_ids", args[0] if args else None)
            self.batches.append(ids.detach().clone())
            return self._forward(*args, **kwargs)

        self.model.forward = recording
        return self

    def __exit__(self, *exc) -> None:
        del self.model.forward  # back to the class's forward


def plain_forward(model, batches: list[torch.Tensor]) -> None:
    with torch.no_grad():
        for ids in batches:
            model(input_ids=ids, use_cache=False)


def seconds_of(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def paired_repeats(name: str, tokens: int, path, baseline, *, pilot: int, max_s: float) -> tuple[list[float], list[float]]:
    """Seconds of ``path()`` and ``baseline()`` run back to back (alternating which goes first): ``pilot``
    pairs, then more until :func:`roofline.enough_pairs` says they resolve 5%, within ``max_s`` seconds."""
    path_s: list[float] = []
    base_s: list[float] = []
    start = time.perf_counter()
    while True:
        r = len(path_s)
        for which in (("path", "baseline") if r % 2 == 0 else ("baseline", "path")):
            (path_s if which == "path" else base_s).append(seconds_of(path if which == "path" else baseline))
        log(f"{name} pair {r}: path {tokens / path_s[-1]:.0f} tok/s, baseline {tokens / base_s[-1]:.0f} tok/s")
        n = len(path_s)
        cap = max(pilot, int(max_s / ((time.perf_counter() - start) / n)))  # the pairs max_s allows at this pace
        if enough_pairs([b / p for p, b in zip(path_s, base_s, strict=True)], pilot, cap):
            log(f"{name}: {n} pairs")
            return path_s, base_s


def summarise(tokens: int, path_s: list[float], base_s: list[float], flops_per_token: float, roof: float) -> dict:
    path, base = spread([tokens / s for s in path_s]), spread([tokens / s for s in base_s])
    ratio = spread([b / p for p, b in zip(path_s, base_s, strict=True)])  # path tok/s / baseline tok/s, per pair
    return {"tokens": tokens, "path_tokens_per_s": path, "baseline_tokens_per_s": base, "ratio": ratio,
            "path_mfu": round(path["median"] * flops_per_token / roof, 4),
            "baseline_mfu": round(base["median"] * flops_per_token / roof, 4),
            "attainable_gflops": round(roof / 1e9, 2),
            "resolves_5pct": ratio["resolves_5pct"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tiny", action="store_true", help="use tiny_llama even when SmolLM2 is prepared")
    ap.add_argument("--tokens", type=int, default=2048, help="perplexity corpus tokens (one repeat)")
    ap.add_argument("--questions", type=int, default=25, help="ARC-Easy questions for the lm-eval path (one repeat)")
    ap.add_argument("--pilot-pairs", type=int, default=16, help="pairs before the spread may stop the run")
    ap.add_argument("--max-s", type=float, default=1500.0, help="the most seconds one path's pairs may take")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    warnings.filterwarnings("ignore")

    from spear.config.schema import EvalConfig
    from spear.evaluation.harness import run_lm_eval
    from spear.evaluation.perplexity import corpus_nll_from_ids, sliding_windows, tokenize_corpus
    from spear.evaluation.proxy import read_corpus
    from spear.models import load_model, resolve_model_dir

    model_ref = "tiny_llama"
    if not args.tiny:
        try:
            resolve_model_dir("smollm2_135m")
            model_ref = "smollm2_135m"
        except SpearError:
            log("bench_evaluate: SmolLM2 not prepared, using tiny_llama")
    model, tokenizer = load_model(model_ref)
    model.eval()
    load = machine_load()
    rows = {}

    # perplexity: the proxy's windows
    ids = tokenize_corpus(tokenizer, read_corpus("general_text", "proxy.general.source"), args.tokens)
    max_length, stride, batch = 512, 256, 4
    windows = sliding_windows(int(ids.numel()), max_length, stride)
    groups = [windows[:1]] + [windows[i : i + batch] for i in range(1, len(windows), batch)]
    batches = [torch.stack([ids[b:e] for b, e, _ in g]) for g in groups if g]
    tokens = sum(int(b.numel()) for b in batches)
    roof = matmul_roofline(model.config, batch * max_length, training=False)["flops_per_s"]
    spear_s, plain_s = paired_repeats(
        "perplexity", tokens,
        lambda: corpus_nll_from_ids(model, ids, max_length=max_length, stride=stride, batch_size=batch),
        lambda: plain_forward(model, batches), pilot=args.pilot_pairs, max_s=args.max_s)
    roof = max(roof, matmul_roofline(model.config, batch * max_length, training=False)["flops_per_s"])  # the faster reading
    rows["perplexity"] = summarise(tokens, spear_s, plain_s, forward_flops_per_token(model.config, max_length), roof)

    # lm-eval loglikelihood requests
    eval_cfg = EvalConfig(tasks=["spear_arc_easy"], limits={"spear_arc_easy": args.questions},
                          general_tasks=["spear_arc_easy"], max_batch_size=64)
    with ForwardRecorder(model) as recorder:
        run_lm_eval(model, tokenizer, eval_cfg)  # warm-up run, and the batches it forwards
    captured = recorder.batches
    tokens = sum(int(b.numel()) for b in captured)
    mean_len = statistics.mean(int(b.shape[1]) for b in captured)
    mean_rows = statistics.mean(int(b.shape[0]) for b in captured)
    roof = matmul_roofline(model.config, int(mean_rows * mean_len), training=False)["flops_per_s"]
    lm_s, replay_s = paired_repeats("lm-eval", tokens, lambda: run_lm_eval(model, tokenizer, eval_cfg),
                                    lambda: plain_forward(model, captured), pilot=args.pilot_pairs, max_s=args.max_s)
    roof = max(roof, matmul_roofline(model.config, int(mean_rows * mean_len), training=False)["flops_per_s"])
    rows["lm_eval_loglikelihood"] = {**summarise(tokens, lm_s, replay_s, forward_flops_per_token(model.config, int(mean_len)), roof),
                                     "batches": len(captured), "mean_batch": [round(mean_rows, 1), round(mean_len, 1)]}

    print(f"{'path':>22} {'tok/s min/med/max':>24} {'baseline tok/s':>15} {'ratio':>7} {'95%':>7} {'pairs':>6} {'MFU':>6}")
    for name, row in rows.items():
        p, b = row["path_tokens_per_s"], row["baseline_tokens_per_s"]
        print(f"{name:>22} {p['min']:7.0f}/{p['median']:7.0f}/{p['max']:7.0f} {b['median']:15.0f} "
              f"{row['ratio']['median']:7.3f} ±{row['ratio']['ci95_rel']:.3f} {row['ratio']['n']:6d} {row['path_mfu']:6.3f}")
    resolved = all(row["resolves_5pct"] for row in rows.values())
    ratios = {name: round(row["ratio"]["median"], 4) for name, row in rows.items()}
    print(json.dumps({"bench": "evaluate", "baseline": "plain batched forward of the same tokens", "model": model_ref,
                      "rows": rows, "ratios": ratios, "target": TARGET, "met": all(v >= TARGET for v in ratios.values()),
                      "resolved": resolved, "note": None if resolved else "the paired ratios spread more than 5%: too noisy to decide",
                      "threads": torch.get_num_threads(), "load_before": load, "load_after": machine_load()}))


if __name__ == "__main__":
    main()
