"""The whole pipeline on tiny_llama: every output, stage reuse, controls, experiment configs."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

TINY = [
    "model=tiny_llama",
    "data=text",
    "data.block_size=64",
    "trainer.max_steps=4",
    "trainer.val_check_interval=2",
    "eval.limits.spear_arc_easy=8",
    "eval.perplexity.corpora.general.max_tokens=256",
    "eval.perplexity.corpora.finance_heldout.max_tokens=256",
]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    rng = random.Random(0)
    words = "ledger account debit credit balance asset liability equity income expense invoice loan".split()
    path = tmp_path_factory.mktemp("corpus") / "finance.txt"
    path.write_text("\n\n".join(" ".join(rng.choice(words) for _ in range(60)) for _ in range(40)))
    return path


@pytest.fixture(scope="module")
def tiny_runs(corpus, tmp_path_factory):
    """Two pipeline runs with the same config sharing one stage cache."""
    from hydra import compose, initialize_config_dir

    from spear import pipeline
    from spear.paths import CONF_DIR

    root = tmp_path_factory.mktemp("pipeline")
    summaries, dirs = [], []
    for i in range(2):
        out = root / f"run{i}"
        overrides = [*TINY, f"data.paths=[{corpus}]", f"pipeline.cache_dir={root / 'cache'}",
                     f"paths.output_dir={out}", "logger=none"]
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
            cfg = compose(config_name="pipeline", overrides=overrides)
        summaries.append(pipeline.run(cfg))
        dirs.append(out)
    return summaries, dirs


def test_pipeline_writes_every_output(tiny_runs):
    summaries, dirs = tiny_runs
    for name in ("summary.json", "summary.md", "pareto.png"):
        assert (dirs[0] / name).stat().st_size > 0, name
    summary = json.loads((dirs[0] / "summary.json").read_text())
    names = [m["name"] for m in summary["models"]]
    assert names == ["base", "adapted", "balanced", "uniform@balanced", "balanced@random"]
    by = {m["name"]: m for m in summary["models"]}
    assert by["base"]["general_retention"] == pytest.approx(1.0)
    assert by["base"]["domain_gain_preservation"] == pytest.approx(0.0)
    assert by["adapted"]["domain_gain_preservation"] == pytest.approx(1.0)
    # the uniform control has the policy's mean t; the random control the same t multiset
    assert by["uniform@balanced"]["mean_t"] == pytest.approx(by["balanced"]["mean_t"])
    assert sorted(by["balanced@random"]["tmap"]["layer_t"].values()) == sorted(by["balanced"]["tmap"]["layer_t"].values())
    assert {r["versus"] for r in summary["relations"]} == {"uniform@balanced", "balanced@random", "adapted"}
    assert summary["cost"]["extra_policy_vs_cpt"] > 0
    assert "| balanced |" in (dirs[0] / "summary.md").read_text()


def test_second_run_reuses_every_stage(tiny_runs):
    summaries, _ = tiny_runs
    first, second = (s["cache"] for s in summaries)
    assert not any(e["hit"] for e in first)
    assert all(e["hit"] for e in second)
    assert {e["stage"] for e in second} >= {"train", "analyze", "evaluate"}
    assert summaries[0]["models"] == summaries[1]["models"]


def test_random_ranking_moves_scores_not_values():
    from spear.pipeline import random_ranking

    ranking = {"num_layers": 4, "order": [2, 0, 3, 1],
               "layers": [{"layer": i, "score": s, "groups": {"attn": s, "mlp": -s}} for i, s in enumerate([0.5, 0.1, 0.9, 0.3])]}
    shuffled = random_ranking(ranking, seed=3)
    assert sorted(e["score"] for e in shuffled["layers"]) == sorted(e["score"] for e in ranking["layers"])
    by_layer = {e["layer"]: e["score"] for e in shuffled["layers"]}
    assert [by_layer[layer] for layer in shuffled["order"]] == [0.9, 0.5, 0.3, 0.1]
    assert random_ranking(ranking, seed=3) == shuffled


def test_unknown_extra_policy_is_a_clear_error():
    from spear.errors import SpearError
    from spear.pipeline import policy_config

    with pytest.raises(SpearError, match="use one of"):
        policy_config("no_such_policy")
    assert policy_config({"policy": "uniform", "t": 0.3, "label": "u3"})["t"] == 0.3


def test_notebook_executes_headless_against_the_run(tiny_runs, monkeypatch):
    import nbformat
    from nbclient import NotebookClient

    from spear.paths import PROJECT_ROOT

    _, dirs = tiny_runs
    monkeypatch.setenv("SPEAR_RUN_DIR", str(dirs[0]))
    notebook = nbformat.read(PROJECT_ROOT / "notebooks" / "inspect_run.ipynb", as_version=4)
    NotebookClient(notebook, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(PROJECT_ROOT)}}).execute()
    outputs = [o for cell in notebook.cells if cell.cell_type == "code" for o in cell.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    assert sum(1 for o in outputs if "image/png" in o.get("data", {})) >= 3  # scores, t map, Pareto
