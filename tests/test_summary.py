"""Summary rows, seed aggregation, Pareto relations and the Markdown of pipeline summaries."""

from __future__ import annotations

import json
import math

import pytest

from spear.tracking.summary import (
    aggregate_seeds,
    markdown_table,
    mean_ci95,
    model_entry,
    relation,
    relations_of,
    summary_markdown,
    write_summary,
)


def _entry(name, gr, dg, **extra):
    return {"name": name, "metrics": {"general_retention": gr, "domain_gain_preservation": dg, **extra}}


def test_mean_ci95_matches_the_t_interval():
    out = mean_ci95([1.0, 2.0, 3.0])
    # sd = 1, t(0.975, 2) = 4.303 (3 decimals): half-width 4.303 / sqrt(3)
    assert out["mean"] == pytest.approx(2.0)
    assert out["ci95"] == pytest.approx([2.0 - 4.303 / math.sqrt(3), 2.0 + 4.303 / math.sqrt(3)], abs=5e-4)
    assert mean_ci95([5.0, None, float("nan")]) == {"mean": 5.0, "ci95": None, "n": 1}
    assert mean_ci95([None])["mean"] is None


@pytest.mark.parametrize(("n", "t95"), [(2, 12.706), (5, 2.776), (10, 2.262), (30, 2.045)])
def test_mean_ci95_quantile_matches_the_t_table(n, t95):
    xs = [float(i % 2) for i in range(n)]
    mean = sum(xs) / n
    sd = math.sqrt(sum((x - mean) ** 2 for x in xs) / (n - 1))
    low, high = mean_ci95(xs)["ci95"]
    assert (high - low) / 2 / (sd / math.sqrt(n)) == pytest.approx(t95, abs=5e-4)


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



RESULTS = {
    "tasks": {
        "arc": {"acc": 0.6},                                              # no stderr: binomial from n
        "hellaswag": {"acc_norm": 0.4, "acc_norm_stderr": 0.01},           # lm-eval's stderr wins
        "gsm8k": {"exact_match,strict": 0.2, "exact_match_stderr,strict": 0.03},  # filtered metric
        "wiki": {"bits_per_byte": 1.1},                                    # not an accuracy: no stderr
        "empty": {"acc": None},
    },
    "primary_metric": {"arc": "acc", "hellaswag": "acc_norm", "gsm8k": "exact_match,strict",
                       "wiki": "bits_per_byte", "empty": "acc"},
    "n_samples": {"arc": 150, "hellaswag": 40, "gsm8k": 10, "wiki": 5},
    "perplexity": {"general": 20.0},
    "nll": {"general": 3.0},
}


def test_model_entry_metrics_stderrs_and_retention():
    retention = {"general_retention": 0.97, "domain_gain_preservation": 0.5, "per_task": {}}
    e = model_entry("balanced", "policy", RESULTS, retention, 7, mean_t=0.4, tmap={"layer_t": {}})
    assert (e["name"], e["kind"], e["seed"], e["mean_t"], e["tmap"]) == ("balanced", "policy", 7, 0.4, {"layer_t": {}})
    m = e["metrics"]
    assert m["arc/acc_stderr"] == pytest.approx(math.sqrt(0.6 * 0.4 / 150))
    assert m["hellaswag/acc_norm_stderr"] == 0.01
    assert m["gsm8k/exact_match,strict"] == 0.2 and m["gsm8k/exact_match,strict_stderr"] == 0.03
    assert m["wiki/bits_per_byte"] == 1.1 and "wiki/bits_per_byte_stderr" not in m
    assert not any(k.startswith("empty/") for k in m)
    assert (m["ppl/general"], m["nll/general"], m["mean_t"]) == (20.0, 3.0, 0.4)
    assert (m["general_retention"], m["domain_gain_preservation"]) == (0.97, 0.5)
    assert "per_task" not in m

    bare = model_entry("x", "freeze", {**RESULTS, "n_samples": {}}, None, 0, mean_t=None)["metrics"]
    assert "general_retention" not in bare and "domain_gain_preservation" not in bare
    assert "arc/acc_stderr" not in bare and bare["mean_t"] is None  # no n: no binomial stderr


def _row(name, kind, gr, dg, **extra):
    return {"kind": kind, **_entry(name, gr, dg), **extra}


ENTRIES = [
    _row("base", "baseline", 1.0, 0.0),
    _row("adapted", "baseline", 0.9, 1.0),
    _row("balanced", "policy", 0.95, 0.9),
    _row("uniform@balanced", "control", 0.96, 0.7, control_of="balanced"),
    _row("balanced@random", "control", 0.93, 0.8, control_of="balanced"),
    _row("freeze_top8", "freeze", 0.99, 0.1),
    _row("solo", "policy", 0.8, 0.9),
]


def test_relations_of_compares_each_policy_with_its_controls_then_adapted():
    assert relations_of(ENTRIES) == [
        {"policy": "balanced", "versus": "uniform@balanced", "relation": "incomparable"},
        {"policy": "balanced", "versus": "balanced@random", "relation": "dominates"},
        {"policy": "balanced", "versus": "adapted", "relation": "incomparable"},
        {"policy": "solo", "versus": "adapted", "relation": "dominated"},
    ]
    assert relations_of([e for e in ENTRIES if e["name"] != "adapted"])[-1]["policy"] == "balanced"


COST = {
    "stages": [{"stage": "train seed 1", "seconds": 600.77, "device_hours": 0.16688, "reused": False},
               {"stage": "evaluate base", "seconds": 3.0, "device_hours": 0.00083, "reused": True}],
    "cpt_seconds": 600.77, "extra_policy_seconds": 41.07, "extra_policy_vs_cpt": 0.06836, "wall_seconds": 700.0,
}


def test_summary_markdown_sections():
    seeded = [{**e, "ci95": {"general_retention": [0.9, 1.0]}} for e in ENTRIES]
    text = summary_markdown({"seeds": [1, 2], "models": seeded, "relations": relations_of(ENTRIES), "cost": COST})
    assert "± half-width of the 95% t-interval over seeds" in text
    assert "| model | general_retention | domain_gain_preservation | mean_t |" in text
    assert "| balanced | 0.950 ± 0.050 | 0.900 | — |" in text
    relations = text.split("## Policy vs controls")[1].split("## Cost")[0]
    assert "| balanced | balanced@random | dominates |" in relations
    assert "| solo | adapted | dominated |" in relations
    assert sum(line.startswith("|") for line in relations.splitlines()) == 2 + 4  # header, rule, a row each
    cost = text.split("## Cost")[1]
    assert "| train seed 1 | 600.8 | 0.1669 | False |" in cost and "| evaluate base | 3.0 | 0.0008 | True |" in cost
    assert "costs 0.068× one CPT run." in cost

    single = summary_markdown({"seeds": [1], "models": ENTRIES, "relations": [],
                               "cost": {**COST, "extra_policy_vs_cpt": None}})
    assert "values are means." in single and "× one CPT run" not in single


def test_write_summary_writes_json_markdown_and_plot(tmp_path):
    summary = {"seeds": [1], "models": ENTRIES, "relations": relations_of(ENTRIES), "cost": COST}
    text = write_summary(tmp_path, summary)
    assert (tmp_path / "summary.md").read_text() == text == summary_markdown(summary)
    assert json.loads((tmp_path / "summary.json").read_text()) == summary
    assert (tmp_path / "pareto.png").stat().st_size > 0


def test_the_zoom_panel_frames_the_fronts_pareto_points(tmp_path):
    """The second panel covers the sweep's Pareto-optimal points (not the dominated ends) with their extent as margin."""
    from PIL import Image

    from spear.tracking.summary import _front_box, pareto_plot

    sweep = [(2.29, 3.11), (2.20, 3.03), (2.16, 2.98), (2.17, 2.97), (2.35, 3.01)]  # t = 0, .25, .5, .75, 1
    x0, x1, y0, y1 = _front_box(sweep)
    pad = 0.019  # a tenth of the sweep's larger extent (2.16..2.35): more than the front's own (0.01)
    assert (x0, x1, y0, y1) == pytest.approx((2.16 - pad, 2.17 + pad, 2.97 - pad, 2.98 + pad))
    per_seed = {"1": [{"t": i / 4, "domain_nll": d, "general_nll": g} for i, (d, g) in enumerate(sweep)]}
    entries = [{"name": "m", "kind": "policy", "metrics": {"nll/dom": 2.165, "nll/gen": 2.975}}]
    with_front = pareto_plot(entries, tmp_path / "front.png", frontier={"domain": "dom", "general": "gen", "per_seed": per_seed})
    without = pareto_plot([_entry("m", 0.9, 0.5)], tmp_path / "plain.png")
    assert Image.open(with_front).size[0] == 2 * Image.open(without).size[0]  # two panels side by side
