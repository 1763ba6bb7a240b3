"""Seed aggregation, Pareto relations and the Markdown tables of pipeline summaries."""

from __future__ import annotations

import math

import pytest

from spear.tracking.summary import aggregate_seeds, markdown_table, mean_ci95, relation


def _entry(name, gr, dg, **extra):
    return {"name": name, "metrics": {"general_retention": gr, "domain_gain_preservation": dg, **extra}}


def test_mean_ci95_matches_the_t_interval():
    out = mean_ci95([1.0, 2.0, 3.0])
    # sd = 1, t(0.975, 2) = 4.303: half-width 4.303 / sqrt(3)
    assert out["mean"] == pytest.approx(2.0)
    assert out["ci95"] == pytest.approx([2.0 - 4.303 / math.sqrt(3), 2.0 + 4.303 / math.sqrt(3)])
    assert mean_ci95([5.0, None, float("nan")]) == {"mean": 5.0, "ci95": None, "n": 1}
    assert mean_ci95([None])["mean"] is None


def test_aggregate_seeds_keeps_model_order_and_intervals():
    seed_a = [_entry("base", 1.0, 0.0), _entry("balanced", 0.9, 0.8)]
    seed_b = [_entry("base", 1.0, 0.0), _entry("balanced", 0.8, 0.6)]
    base, balanced = aggregate_seeds([seed_a, seed_b])
    assert [base["name"], balanced["name"]] == ["base", "balanced"]
    assert balanced["metrics"]["general_retention"] == pytest.approx(0.85)
    assert balanced["ci95"]["general_retention"][0] < 0.85 < balanced["ci95"]["general_retention"][1]
    assert base["ci95"]["general_retention"] == pytest.approx([1.0, 1.0])  # no spread, zero width


def test_relation_verdicts():
    a, b = _entry("a", 0.9, 0.9), _entry("b", 0.8, 0.5)
    assert relation(a, b) == "dominates" and relation(b, a) == "dominated"
    assert relation(_entry("c", 0.95, 0.1), a) == "incomparable"
    assert relation(a, dict(a)) == "equal"
    assert relation(_entry("d", None, 0.5), a) == "unknown"
    wide = {**a, "ci95": {"general_retention": [0.7, 1.0], "domain_gain_preservation": [0.4, 1.0]}}
    wide_b = {**b, "ci95": {"general_retention": [0.7, 0.9], "domain_gain_preservation": [0.45, 0.6]}}
    assert relation(wide, wide_b) == "dominates (within noise)"


def test_markdown_table_shows_intervals_else_standard_errors():
    single = _entry("adapted", 1.0, 1.0, **{"arc/acc": 0.565, "arc/acc_stderr": 0.035})
    table = markdown_table([single], ["general_retention", "arc/acc"])
    assert "0.565 (se 0.035)" in table and "| adapted | 1.000 |" in table
    seeds = {**single, "ci95": {"arc/acc": [0.5, 0.6]}}
    assert "0.565 ± 0.050" in markdown_table([seeds], ["arc/acc"])
    assert "—" in markdown_table([_entry("x", None, 0.2)], ["general_retention"])


def test_collate_posterior_section_correlates_proxies_with_measurements(tmp_path):
    import json

    from spear.tracking.collate import posterior_section

    truth = [0.04, 0.01, 0.03, -0.02]
    layers = [{"layer": i, "metrics": {"rel_change": t, "swci": -t, "svdr_whole": 0.5, "random": 0.1 * i},
               "posterior": {"score": t, "general_recovery": t, "domain_change": -t}} for i, t in enumerate(truth)]
    ranking = {"order": [0, 2, 1, 3], "layers": layers, "num_layers": 4, "impact": {"name": "posterior"},
               "posterior": {"reference": {"adapted": {"general": 3.2, "domain": 2.3}, "base": {"general": 3.1, "domain": 2.4}},
                             "corpora": {"tokens": {"general": 64, "domain": 64}}}}
    (tmp_path / "ranking.json").write_text(json.dumps(ranking))
    text = posterior_section(tmp_path)
    assert "| rel_change | 1.000 |" in text and "| swci | -1.000 |" in text
    assert "| impact:combined | 1.000 |" in text  # the default preset is rel_change
    assert "| 3 | -0.0200 | +0.0200 |" in text
