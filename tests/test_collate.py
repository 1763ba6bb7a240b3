"""Collating pipeline runs into an experiment record: names per job, shared tables, cost, posterior."""

from __future__ import annotations

import json
from pathlib import Path

from spear.tracking.collate import main, posterior_section


def _model(name: str, kind: str, gr: float, dg: float, **extra) -> dict:
    metrics = {"general_retention": gr, "domain_gain_preservation": dg, "mean_t": 0.5, "nll/general": 3.0 + gr}
    return {"name": name, "kind": kind, "seeds": [1234], "metrics": metrics, **extra}


def _job(root: Path, index: int, override: str, policy_gr: float, wall: float) -> Path:
    run = root / str(index)
    (run / ".hydra").mkdir(parents=True)
    (run / ".hydra" / "overrides.yaml").write_text(f"- +experiment=demo\n- {override}\n")
    models = [_model("base", "baseline", 1.0, 0.0), _model("adapted", "baseline", 0.95 if index else 0.90, 0.8),
              _model("balanced", "policy", policy_gr, 0.8),
              _model("uniform@balanced", "control", 0.95, 0.9, control_of="balanced")]
    cost = {"stages": [], "cpt_seconds": 600.0, "extra_policy_seconds": 40.0, "extra_policy_vs_cpt": 40 / 600,
            "wall_seconds": wall}
    (run / "summary.json").write_text(json.dumps({"seeds": [1234], "models": models, "relations": [], "cost": cost}))
    return run


def test_collate_multirun_renders_each_job_against_shared_baselines(tmp_path):
    multirun = tmp_path / "multirun"
    _job(multirun, 0, "merge=slerp", 0.97, 100.0)
    _job(multirun, 1, "merge=linear", 0.93, 200.0)
    out = main([str(multirun), "--experiment", "demo", "--out", str(tmp_path / "out")])
    readme = (out / "README.md").read_text()
    assert readme.startswith("# demo\n") and "python -m spear.pipeline +experiment=demo" in readme
    results = readme.split("## Results")[1].split("Raw metrics:")[0]
    assert [line.split(" | ")[0] for line in results.splitlines() if line.startswith("| ") and "---" not in line] == [
        "| model", "| base", "| adapted", "| balanced [merge=slerp]", "| uniform@balanced [merge=slerp]",
        "| balanced [merge=linear]", "| uniform@balanced [merge=linear]"]
    assert "| balanced [merge=slerp] | 0.970 | 0.800 | 0.500 |" in results
    assert "| nll/general |" in readme.split("Raw metrics:")[1]
    relations = readme.split("## Policy vs controls")[1].split("## Cost")[0]
    # the adapted row shown is the first job's (0.90, 0.8): the relations are drawn against it, not
    # against the second job's own (0.95, 0.8), so linear (0.93, 0.8) dominates it too
    assert "| balanced [merge=slerp] | uniform@balanced [merge=slerp] | incomparable |" in relations
    assert "| balanced [merge=linear] | uniform@balanced [merge=linear] | dominated |" in relations
    assert "| balanced [merge=slerp] | adapted | dominates |" in relations
    assert "| balanced [merge=linear] | adapted | dominates |" in relations
    assert "| adapted | 0.900 |" in results
    cost = readme.split("## Cost")[1]
    assert "| merge=slerp | 600.0 | 40.0 | 0.067 | 100.0 |" in cost and "| merge=linear | 600.0 | 40.0 | 0.067 | 200.0 |" in cost
    recorded = json.loads((out / "summary.json").read_text())
    assert len(recorded["models"]) == 6 and len(recorded["relations"]) == 4
    assert (out / "pareto.png").stat().st_size > 0


def test_collate_posterior_section_correlates_proxies_with_measurements(tmp_path):
    truth = [0.04, 0.01, 0.03, -0.02]
    layers = [{"layer": i, "score": t, "metrics": {"rel_change": t, "swci": -t, "svdr_whole": 0.5, "random": 0.1 * i},
               "posterior": {"score": t, "general_recovery": t, "domain_change": -t}} for i, t in enumerate(truth)]
    ranking = {"order": [0, 2, 1, 3], "layers": layers, "num_layers": 4, "impact": {"name": "posterior"},
               "posterior": {"reference": {"adapted": {"general": 3.2, "domain": 2.3}, "base": {"general": 3.1, "domain": 2.4}},
                             "corpora": {"tokens": {"general": 64, "domain": 64}}}}
    (tmp_path / "ranking.json").write_text(json.dumps(ranking))
    text = posterior_section(tmp_path)
    assert "| rel_change | 1.000 |" in text and "| swci | -1.000 |" in text
    assert "| impact:combined | 1.000 |" in text  # the default preset is rel_change
    assert "| 3 | -0.0200 | +0.0200 |" in text


def test_collate_renders_the_frontier_advantage_and_draws_the_front(tmp_path):
    run = tmp_path / "run"
    (run / ".hydra").mkdir(parents=True)
    (run / ".hydra" / "overrides.yaml").write_text("- +experiment=demo\n")
    sweep = [{"t": 0.0, "domain_nll": 2.3, "general_nll": 3.1}, {"t": 1.0, "domain_nll": 2.4, "general_nll": 3.0}]

    def model(name, kind, d, g, adv):
        return {"name": name, "kind": kind, "seeds": [1, 2],
                "metrics": {"nll/finance_heldout": d, "nll/general": g, "frontier/general": adv, "frontier/domain": adv},
                "ci95": {"frontier/general": [adv - 0.01, adv + 0.01]},
                "frontier_advantage": {"general": {"mean": adv, "ci95": [adv - 0.01, adv + 0.01]},
                                       "domain": {"mean": adv, "ci95": None}}}

    models = [model("base", "baseline", 2.4, 3.0, 0.0), model("adapted", "baseline", 2.3, 3.1, 0.0),
              model("optimized", "policy", 2.3, 2.95, 0.1)]
    frontier = {"ts": [0.0, 1.0], "general": "general", "domain": "finance_heldout", "per_seed": {"1": sweep, "2": sweep}}
    cost = {"stages": [], "cpt_seconds": 1.0, "extra_policy_seconds": 1.0, "extra_policy_vs_cpt": 1.0, "wall_seconds": 1.0}
    (run / "summary.json").write_text(json.dumps({"seeds": [1, 2], "models": models, "relations": [], "cost": cost,
                                                  "frontier": frontier}))
    out = main([str(run), "--experiment", "demo", "--out", str(tmp_path / "out")])
    readme = (out / "README.md").read_text()
    assert "## Against the uniform frontier" in readme
    assert "- `optimized`: general +0.1000 ± 0.0100 (beats the front: the 95% interval is above 0)" in readme
    assert "frontier/general" in readme.split("## Results")[1].split("Raw metrics:")[0]
    assert json.loads((out / "summary.json").read_text())["frontier"] == frontier
