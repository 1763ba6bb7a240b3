"""The benchmarks' shared arithmetic: FLOP counts against torch's own counter, and the pair-count rule.

The MFU figures and the "resolved" verdicts in the README rest on these; a wrong FLOP count or a pair
count that undershoots would print confident numbers that are not so.
"""

from __future__ import annotations

import random
import sys
from pathlib import Path

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import roofline  # noqa: E402


@pytest.fixture(scope="module")
def gqa_config() -> LlamaConfig:
    """A tiny Llama with grouped-query attention and an untied output layer, eager attention so every
    attention product is a counted matmul."""
    config = LlamaConfig(hidden_size=48, intermediate_size=80, num_hidden_layers=3, num_attention_heads=6,
                         num_key_value_heads=2, vocab_size=97, tie_word_embeddings=False)
    config._attn_implementation = "eager"
    return config


def test_multiplying_params_are_the_linear_weights(gqa_config):
    model = LlamaForCausalLM(gqa_config)
    linear = sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))
    assert roofline.multiplying_params(gqa_config) == linear


def test_gemm_shapes_carry_the_model_flops(gqa_config):
    tokens = 32
    gemm = sum(2 * m * k * n * count for m, k, n, count in roofline.gemm_shapes(gqa_config, tokens))
    assert gemm == 2 * roofline.multiplying_params(gqa_config) * tokens


def _counted_flops(model, ids, backward: bool) -> int:
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        logits = model(input_ids=ids).logits
        if backward:
            logits.float().pow(2).mean().backward()
    return counter.get_total_flops()


@pytest.mark.parametrize("seq_len", [16, 40])
def test_flops_per_token_match_torch_counter(gqa_config, seq_len):
    """PaLM's convention counts full (not causal-halved) attention, as eager attention computes it."""
    torch.manual_seed(0)
    model = LlamaForCausalLM(gqa_config)
    ids = torch.randint(0, gqa_config.vocab_size, (2, seq_len))
    tokens = ids.numel()
    forward = _counted_flops(model, ids, backward=False)
    assert forward == pytest.approx(roofline.forward_flops_per_token(gqa_config, seq_len) * tokens, rel=1e-9)
    train = _counted_flops(model, ids, backward=True)
    assert train == pytest.approx(roofline.train_flops_per_token(gqa_config, seq_len) * tokens, rel=1e-9)


def test_spread_verdicts():
    tight = roofline.spread([1.0, 1.001, 0.999, 1.0])
    assert tight["resolves_5pct"] and tight["ci95_rel"] < 0.01
    wide = roofline.spread([0.8, 1.2, 0.9, 1.1])
    assert not wide["resolves_5pct"] and wide["rel_range"] == pytest.approx(0.4)
    single = roofline.spread([1.0])
    assert not single["resolves_5pct"]


def test_pairs_needed_bounds():
    assert roofline.pairs_needed([1.0, 1.0001, 0.9999, 1.0], pilot=4, cap=100) == 4  # never fewer than the pilot
    assert roofline.pairs_needed([0.5, 1.5, 0.7, 1.3], pilot=4, cap=100) == 100  # never more than the cap


def test_pairs_needed_scales_with_variance():
    rng = random.Random(1)
    pilot = [rng.gauss(1.0, 0.05) for _ in range(16)]
    doubled = [1.0 + 2 * (r - 1.0) for r in pilot]
    small, large = (roofline.pairs_needed(p, pilot=16, cap=10_000) for p in (pilot, doubled))
    assert large == pytest.approx(4 * small, rel=0.05)


def _simulate(draw, rng: random.Random, trials: int, pilot: int = 16, cap: int = 400) -> tuple[float, float, float]:
    """(share resolved, share of intervals covering the true mean, mean pairs) of ``trials`` runs that
    stop by :func:`roofline.enough_pairs`."""
    resolved = covered = pairs = 0
    for _ in range(trials):
        ratios = [draw(rng) for _ in range(pilot)]
        while not roofline.enough_pairs(ratios, pilot, cap):
            ratios.append(draw(rng))
        summary = roofline.spread(ratios)
        mean = sum(ratios) / len(ratios)
        resolved += summary["resolves_5pct"]
        covered += abs(mean - draw.mean) <= summary["ci95_rel"] * mean
        pairs += len(ratios)
    return resolved / trials, covered / trials, pairs / trials


def _gauss(mean: float, sd: float):
    def draw(rng):
        return rng.gauss(mean, sd)

    draw.mean = mean
    return draw


def _with_slow_spells(mean: float, sd: float, share: float, hit: float):
    """What the VM does: most pairs spread ``sd``, a ``share`` of them lands one side in a slow spell."""
    def draw(rng):
        r = rng.gauss(mean, sd)
        return r * (1 - hit) if rng.random() < share else r

    draw.mean = mean * (1 - share * hit)
    return draw


@pytest.mark.parametrize("draw", [_gauss(1.03, 0.10), _with_slow_spells(0.89, 0.06, 0.1, 0.18)],
                         ids=["gaussian", "slow_spells"])
def test_sequential_rule_resolves_and_keeps_coverage(draw):
    """Ratios spreading like bench_train's and bench_evaluate's: a run the rule stops (not the cap)
    has resolved 5%, its half-width at most 1/sqrt(1.2) of the target, and the intervals cover the
    true ratio about 95% of the time, since the rule stops on the spread, not on the mean."""
    resolved, covered, pairs = _simulate(draw, random.Random(0), trials=400)
    assert resolved == 1.0
    assert 0.92 <= covered <= 0.99
    assert pairs < 200  # far from the cap: the rule stopped the runs, not the cap
