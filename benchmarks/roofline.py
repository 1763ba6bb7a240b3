"""The machine's limits, measured in the same run as a benchmark, and the repeat statistics benchmarks share.

- :func:`matmul_roofline`: attainable matmul FLOP/s at a model's own GEMM shapes (every projection
  of a decoder layer and the vocabulary projection, forward and the two backward GEMMs), timed for
  ``min_seconds`` each; the figure is the FLOP-weighted rate (total FLOPs / total time), i.e. what
  the model's matmuls alone would reach if nothing else ran.
- :func:`memory_bandwidth`: bytes/s of a large tensor copy (read + write), the roof for memory-bound work.
- :func:`train_flops_per_token` / :func:`forward_flops_per_token`: model FLOPs per token, PaLM's
  convention (arXiv 2204.02311, App. B): ``6 N + 12 L H Q T`` for training, a third of it forward,
  with ``N`` the parameters that multiply (the embedding lookup excluded, the vocabulary projection
  included), ``L`` layers, ``H`` heads of size ``Q``, ``T`` the sequence length.
- :func:`spread`: min / median / max of repeats, the 95% interval of their mean, and whether they resolve
  a 5% difference; :func:`enough_pairs`: when paired repeats have resolved it (or hit their cap).

``python benchmarks/roofline.py`` prints the figures for the embedded SmolLM2 shape.
"""

from __future__ import annotations

import json
import math
import os
import statistics
import time
from typing import Any

import torch

RESOLVE = 0.05  # the difference a benchmark must resolve (its 95% interval within half of it)


def _dims(config) -> dict[str, int]:
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    return {"hidden": config.hidden_size, "inter": config.intermediate_size, "layers": config.num_hidden_layers,
            "heads": heads, "kv_heads": getattr(config, "num_key_value_heads", None) or heads,
            "head_dim": head_dim, "vocab": config.vocab_size}


def gemm_shapes(config, tokens: int) -> list[tuple[int, int, int, int]]:
    """(m, k, n, count) of the forward GEMMs of one step over ``tokens`` tokens (Llama-style blocks)."""
    d = _dims(config)
    h, q, kv = d["hidden"], d["heads"] * d["head_dim"], d["kv_heads"] * d["head_dim"]
    layer = [(tokens, h, q, 2), (tokens, h, kv, 2), (tokens, h, d["inter"], 2), (tokens, d["inter"], h, 1)]  # q+o, k+v, gate+up, down
    return [(m, k, n, c * d["layers"]) for m, k, n, c in layer] + [(tokens, h, d["vocab"], 1)]


def multiplying_params(config) -> int:
    d = _dims(config)
    h, q, kv = d["hidden"], d["heads"] * d["head_dim"], d["kv_heads"] * d["head_dim"]
    return d["layers"] * (2 * h * q + 2 * h * kv + 3 * h * d["inter"]) + h * d["vocab"]


def train_flops_per_token(config, seq_len: int) -> float:
    d = _dims(config)
    return 6.0 * multiplying_params(config) + 12.0 * d["layers"] * d["heads"] * d["head_dim"] * seq_len


def forward_flops_per_token(config, seq_len: int) -> float:
    return train_flops_per_token(config, seq_len) / 3.0


def _time_op(fn, min_seconds: float) -> float:
    """Seconds per call of ``fn``, timed over at least ``min_seconds`` after one untimed call."""
    fn()
    calls, start = 0, time.perf_counter()
    while True:
        fn()
        calls += 1
        elapsed = time.perf_counter() - start
        if elapsed >= min_seconds:
            return elapsed / calls


def matmul_roofline(config, tokens: int, *, dtype=torch.float32, device: str = "cpu", min_seconds: float = 0.5,
                    training: bool = True) -> dict[str, Any]:
    """Attainable FLOP/s of the model's GEMM mix (``training``: forward + dgrad + wgrad shapes)."""
    total_flops = total_seconds = 0.0
    per_shape = []
    for m, k, n, count in gemm_shapes(config, tokens):
        shapes = [(m, k, n)] + ([(m, n, k), (k, m, n)] if training else [])  # dgrad, wgrad
        for a, b, c in shapes:
            x = torch.randn(a, b, dtype=dtype, device=device)
            w = torch.randn(b, c, dtype=dtype, device=device)
            sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)

            def op(x=x, w=w, sync=sync):
                torch.mm(x, w)
                sync()

            seconds = _time_op(op, min_seconds)
            flops = 2.0 * a * b * c
            per_shape.append({"shape": [a, b, c], "gflops": round(flops / seconds / 1e9, 2)})
            total_flops += flops * count
            total_seconds += seconds * count
            del x, w
    return {"flops_per_s": total_flops / total_seconds, "dtype": str(dtype).removeprefix("torch."),
            "threads": torch.get_num_threads(), "per_shape": per_shape}


def memory_bandwidth(nbytes: int = 1 << 28, *, device: str = "cpu", min_seconds: float = 0.5) -> float:
    """Bytes/s of ``dst.copy_(src)`` over ``nbytes`` (each byte read once and written once)."""
    src = torch.empty(nbytes // 4, dtype=torch.float32, device=device).normal_()
    dst = torch.empty_like(src)
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)

    def op():
        dst.copy_(src)
        sync()

    return 2.0 * src.numel() * 4 / _time_op(op, min_seconds)


def spread(values: list[float]) -> dict[str, Any]:
    """min / median / max of repeats, their relative range, and the 95% t-interval of the mean relative to
    it: the repeats resolve a :data:`RESOLVE` difference when that half-width is at most half of it (two
    figures that far apart then have disjoint intervals)."""
    from scipy import stats

    med, mean = statistics.median(values), statistics.fmean(values)
    rel = (max(values) - min(values)) / med if med else float("inf")
    n = len(values)
    half = float(stats.t.ppf(0.975, n - 1)) * statistics.stdev(values) / n ** 0.5 / mean if n > 1 and mean else float("inf")
    return {"values": [round(v, 4) for v in values], "min": min(values), "median": med, "max": max(values), "n": n,
            "rel_range": round(rel, 4),
            "ci95_rel": round(half, 4), "resolves_5pct": bool(half <= RESOLVE / 2)}


def pairs_needed(ratios: list[float], pilot: int, cap: int) -> int:
    """The pairs whose 95% interval of the mean ratio is within ±RESOLVE/2, estimated from the spread of
    ``ratios`` (Stein's sample size, 20% more for the error in that spread), at least ``pilot``, at most
    ``cap``."""
    from scipy import stats

    rel_sd = statistics.stdev(ratios) / statistics.fmean(ratios)
    need = math.ceil(1.2 * (float(stats.t.ppf(0.975, len(ratios) - 1)) * rel_sd / (RESOLVE / 2)) ** 2)
    return min(cap, max(pilot, need))


def enough_pairs(ratios: list[float], pilot: int, cap: int) -> bool:
    """Whether a paired benchmark may stop: the Chow-Robbins fixed-width rule (Ann. Math. Statist. 36,
    1965), the first count past the pilot that :func:`pairs_needed` of all pairs so far does not exceed.
    A count fixed once from the pilot (Stein's two stages) undershoots when the pilot happens to miss
    the machine's occasional slow step; re-estimating as pairs come in does not, and since the rule
    stops on the relative spread, not on where the mean lies, the interval keeps its 95% coverage
    (tests/test_roofline.py simulates it). Never true before ``pilot`` pairs unless ``cap`` is smaller."""
    n = len(ratios)
    return n >= cap or (n >= pilot and n >= pairs_needed(ratios, pilot, cap))


def machine_load() -> dict[str, Any]:
    """The 1-minute load average against the cores: a shared machine's times are upper bounds."""
    return {"load_avg_1m": round(os.getloadavg()[0], 2), "cpus": os.cpu_count()}


if __name__ == "__main__":
    from transformers import LlamaConfig

    smollm2 = LlamaConfig(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                          num_key_value_heads=3, vocab_size=49152)
    roof = matmul_roofline(smollm2, tokens=1024)
    print(json.dumps({"bench": "roofline", "model": "smollm2_135m shape, 1024 tokens",
                      "matmul_gflops": round(roof["flops_per_s"] / 1e9, 2),
                      "copy_gb_per_s": round(memory_bandwidth() / 1e9, 2),
                      "train_gflop_per_token": round(train_flops_per_token(smollm2, 256) / 1e9, 3),
                      **machine_load()}))
