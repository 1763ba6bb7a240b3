"""The whole pipeline on tiny_llama: every output, stage reuse, controls, experiment configs."""

from __future__ import annotations

import json

import pytest

TINY = [
    "model=tiny_llama",
    "data=text",
    "data.block_size=64",
    "trainer.max_steps=4",
    "trainer.val_check_interval=2",
    "eval.limits.spear_arc_easy=8",
    "proxy.general.max_tokens=256",
    "proxy.domain.max_tokens=256",
]


@pytest.fixture(scope="module")
def tiny_runs(corpus, tmp_path_factory):
    """Two pipeline runs with the same config sharing one stage cache."""
    from spear.config import compose
    from spear.pipeline import run_pipeline

    root = tmp_path_factory.mktemp("pipeline")
    summaries, dirs = [], []
    for i in range(2):
        out = root / f"run{i}"
        overrides = [*TINY, f"data.paths=[{corpus}]", f"pipeline.cache_dir={root / 'cache'}",
                     f"paths.output_dir={out}", "logger=none", "progress=false"]
        summaries.append(run_pipeline(compose("pipeline", overrides)))
        dirs.append(out)
    return summaries, dirs


def test_pipeline_writes_every_output(tiny_runs):
    summaries, dirs = tiny_runs
    for name in ("summary.json", "summary.md", "pareto.png"):
        assert (dirs[0] / name).stat().st_size > 0, name
    summary = json.loads((dirs[0] / "summary.json").read_text())
    names = [m["name"] for m in summary["models"]]
    assert names == ["base", "adapted", "uniform_t0.25", "uniform_t0.5", "uniform_t0.75",
                     "balanced", "uniform@balanced", "balanced@random"]
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
    # not true by definition: CPT moved the model, and the controls differ from the policy
    assert by["adapted"]["metrics"]["nll/general_chat"] != pytest.approx(by["base"]["metrics"]["nll/general_chat"], abs=1e-4)
    assert by["balanced@random"]["tmap"] != by["balanced"]["tmap"]
    # the uniform frontier: t=0 is the adapted model and t=1 the base; no sweep point beats its own front
    sweep = summary["frontier"]["per_seed"]["1234"]
    assert [p["t"] for p in sweep] == [0.0, 0.25, 0.5, 0.75, 1.0]
    assert sweep[0]["general_nll"] == by["adapted"]["metrics"]["nll/general_chat"]
    assert sweep[-1]["domain_nll"] == by["base"]["metrics"]["nll/finance_heldout"]
    for name in ("base", "adapted", "uniform_t0.25", "uniform_t0.5", "uniform_t0.75"):
        adv = by[name]["frontier_advantage"]
        assert adv["general"]["mean"] <= 1e-12 and adv["domain"]["mean"] <= 1e-12, name
    assert set(by["balanced"]["frontier_advantage"]) == {"general", "domain"}
    assert "## Against the uniform frontier" in (dirs[0] / "summary.md").read_text()


def test_pipeline_numbers_are_what_the_standalone_stages_give(tiny_runs, compose, tmp_path):
    """The balanced model of the summary, merged again on disk and evaluated by spear.evaluate, has
    the NLL the pipeline reported (its in-memory merge, stage configs and cache agree with the stages)."""
    from spear.evaluation.stage import run_evaluate
    from spear.merging.stage import run_merge

    summaries, _ = tiny_runs
    artifacts = summaries[0]["artifacts"]["1234"]
    merged = run_merge(compose("merge", ["model=tiny_llama", f"adapted={artifacts['adapted_model']}",
                                         f"ranking={artifacts['ranking']}", "policy=balanced", "progress=false"],
                               output_dir=tmp_path / "merge"))
    reported = next(m for m in summaries[0]["per_seed"][0] if m["name"] == "balanced")
    assert merged["layer_t"] == reported["tmap"]["layer_t"]
    evaluated = run_evaluate(compose("evaluate", ["model=tiny_llama", f"model.ref={merged['model_dir']}", "eval=perplexity",
                                                  *[o for o in TINY if o.startswith("proxy.")], "progress=false"],
                                     output_dir=tmp_path / "eval"))
    for corpus, nll in evaluated["results"]["nll"].items():
        assert nll == pytest.approx(reported["metrics"][f"nll/{corpus}"], abs=1e-5), corpus


def test_second_run_reuses_every_stage(tiny_runs):
    summaries, _ = tiny_runs
    first, second = (s["cache"] for s in summaries)
    assert not any(e["hit"] for e in first)
    assert all(e["hit"] for e in second)
    assert {e["stage"] for e in second} >= {"train", "analyze", "evaluate"}
    assert summaries[0]["models"] == summaries[1]["models"]


def test_unknown_extra_policy_is_a_clear_error():
    from spear.errors import SpearError
    from spear.merging.controls import policy_from_spec

    with pytest.raises(SpearError, match="policy: <one of"):
        policy_from_spec("no_such_policy")
    with pytest.raises(SpearError, match="policy.t=2"):
        policy_from_spec({"policy": "uniform", "t": 2})
    assert policy_from_spec({"policy": "uniform", "t": 0.3, "label": "u3"}).t == 0.3


def test_invalid_inputs_fail_before_anything_is_evaluated(corpus, tmp_path):
    from spear.config import compose
    from spear.errors import SpearError
    from spear.pipeline import run_pipeline

    overrides = [*TINY, f"data.paths=[{corpus}]", f"pipeline.cache_dir={tmp_path / 'cache'}",
                 f"paths.output_dir={tmp_path / 'run'}", "logger=none"]
    with pytest.raises(SpearError, match="extra_policies"):
        run_pipeline(compose("pipeline", [*overrides, "pipeline.extra_policies=[nope]"]))
    with pytest.raises(SpearError, match="proxy.general.source"):
        run_pipeline(compose("pipeline", [*overrides, f"proxy.general.source={tmp_path / 'missing.txt'}"]))
    # a multi-process trainer would re-run the whole pipeline once per rank: the CPT goes through spear.train
    with pytest.raises(SpearError, match=r"trainer.devices=2 .*pipeline.adapted=<run dir>/model"):
        run_pipeline(compose("pipeline", [*overrides, "trainer=ddp_cpu"]))
    assert not (tmp_path / "cache").exists()


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


def test_a_killed_pipeline_resumes_from_its_finished_stages(tiny_runs, corpus, tmp_path):
    """SIGKILL once CPT is in the cache; the rerun reuses it (nothing recomputed) and reports what an
    uninterrupted run does."""
    import os
    import signal
    import subprocess
    import sys
    import time

    from spear.paths import PROJECT_ROOT

    cache, out = tmp_path / "cache", tmp_path / "run"
    command = [sys.executable, "-m", "spear.pipeline", *TINY, f"data.paths=[{corpus}]", f"pipeline.cache_dir={cache}",
               "logger=none", "progress=false", f"hydra.run.dir={out}"]
    proc = subprocess.Popen(command, cwd=PROJECT_ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 300
    while not list(cache.glob("train/*/done.json")) and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (out / "summary.json").exists(), "the run finished before it could be killed"
    trained = next(cache.glob("train/*/run/model/model.safetensors"))
    stamp = trained.stat().st_mtime_ns

    done = subprocess.run(command, cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    summary = json.loads((out / "summary.json").read_text())
    events = {e["stage"]: e["hit"] for e in summary["cache"] if e["stage"] == "train"}
    assert events == {"train": True} and trained.stat().st_mtime_ns == stamp
    uninterrupted = tiny_runs[0][0]
    assert [m["metrics"] for m in summary["models"]] == [m["metrics"] for m in uninterrupted["models"]]


def test_fitted_and_data_free_methods_with_their_own_kernels(corpus, tmp_path):
    """optimized (fitted on calibration text, its fit recorded), DG-Hard alone (its own kernel), LiNeS
    with controls and balanced on its own ranking proxy: each a model of the summary, the random control a
    permutation of the entry's t map."""
    from spear.analysis.ranking import Ranking
    from spear.config import compose
    from spear.config.schema import BalancedPolicy
    from spear.merging.policies import build_tmap
    from spear.pipeline import run_pipeline

    extra = ("pipeline.extra_policies=[{policy: optimized, steps: 2, window: 64, calibration_tokens: 256},"
             "{policy: uniform, t: 0.0, merge: {name: dg_hard, scope: all}}, lines,"
             "{policy: balanced, impact: {name: grad_delta, calibration_tokens: 256}}]")
    summary = run_pipeline(compose("pipeline", [
        *TINY, f"data.paths=[{corpus}]", f"pipeline.cache_dir={tmp_path / 'cache'}", f"paths.output_dir={tmp_path / 'run'}",
        "logger=none", "progress=false", "pipeline.frontier.ts=[0.0,1.0]", extra]))
    by = {m["name"]: m for m in summary["models"]}
    assert {"optimized_w1", "uniform@optimized_w1", "optimized_w1@random", "uniform_t0.0+dg_hard_all", "lines",
            "lines@random"} <= set(by)
    fit = by["optimized_w1"]["fit"]
    assert fit["calibration"]["general"]["part"] == "calibration" and len(fit["t"]) == 5  # 4 layers + non-layer
    assert sorted(by["optimized_w1@random"]["tmap"]["layer_t"].values()) == sorted(by["optimized_w1"]["tmap"]["layer_t"].values())
    assert sorted(by["lines@random"]["tmap"]["layer_t"].values()) == sorted(by["lines"]["tmap"]["layer_t"].values())
    assert by["lines@random"]["tmap"] != by["lines"]["tmap"]
    dg = by["uniform_t0.0+dg_hard_all"]
    assert dg["merge"]["name"] == "dg_hard" and dg["metrics"]["nll/general_chat"] != by["adapted"]["metrics"]["nll/general_chat"]
    assert any(e["stage"] == "fit" for e in summary["cache"])
    # the entry with its own impact is ranked by a second analysis of the same adapted model
    assert sum(e["stage"] == "analyze" for e in summary["cache"]) == 2
    own = Ranking.load(summary["artifacts"]["1234"]["rankings"]["balanced_grad_delta"])
    assert own.document["impact"]["name"] == "grad_delta"
    assert by["balanced_grad_delta"]["tmap"] == build_tmap(own, BalancedPolicy(), own.num_layers).to_json()
    assert {"uniform@balanced_grad_delta", "balanced_grad_delta@random"} <= set(by)


def test_two_entries_with_one_name_are_an_error_before_anything_runs(corpus, tmp_path):
    from spear.config import compose
    from spear.errors import SpearError
    from spear.pipeline import run_pipeline

    with pytest.raises(SpearError, match="both named 'lines'"):
        run_pipeline(compose("pipeline", [*TINY, f"data.paths=[{corpus}]", f"pipeline.cache_dir={tmp_path / 'cache'}",
                                          f"paths.output_dir={tmp_path / 'run'}", "logger=none",
                                          "pipeline.extra_policies=[lines, {policy: lines, t_first: 0.5}]"]))
    assert not (tmp_path / "cache").exists()


def test_the_stage_cache_records_absolute_paths(tmp_path, monkeypatch):
    """A relative pipeline.cache_dir is resolved once, so a later run from another directory finds its outputs."""
    from spear.config import compose
    from spear.pipeline import PipelineState

    monkeypatch.chdir(tmp_path)
    (tmp_path / "x.txt").write_text("a training corpus of a few words, enough to be read and checked for overlap\n")
    state = PipelineState(compose("pipeline", [*TINY, "data.paths=[x.txt]", "pipeline.cache_dir=rel/cache",
                                               f"paths.output_dir={tmp_path / 'run'}", "logger=none"]))
    assert state.cache.root == tmp_path / "rel" / "cache"


def test_a_parallel_joblib_sweep_shares_one_cpt(corpus, tmp_path):
    """`-m hydra/launcher=joblib` with two policies: the two jobs run at once, and CPT runs exactly once
    (the second job waits on the stage-cache key and reuses the first one's result)."""
    import subprocess
    import sys

    from spear.paths import PROJECT_ROOT

    proc = subprocess.run(
        [sys.executable, "-m", "spear.pipeline", "-m", "hydra/launcher=joblib", "hydra.launcher.n_jobs=2",
         "policy=balanced,aggressive", *TINY, f"data.paths=[{corpus}]",
         f"pipeline.cache_dir={tmp_path / 'cache'}", f"hydra.sweep.dir={tmp_path / 'multi'}", "logger=none",
         "progress=false", "pipeline.frontier.ts=[0.0,1.0]"],
        capture_output=True, text=True, cwd=PROJECT_ROOT, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "is launching 2 jobs" in proc.stdout + proc.stderr
    summaries = [json.loads((tmp_path / "multi" / str(job) / "summary.json").read_text()) for job in (0, 1)]
    trains = [e["hit"] for s in summaries for e in s["cache"] if e["stage"] == "train"]
    assert sorted(trains) == [False, True] and len(list((tmp_path / "cache" / "train").glob("*/done.json"))) == 1
    assert {s["models"][2]["name"] for s in summaries} == {"balanced", "aggressive"}


def test_an_entry_can_leave_its_controls_out():
    from spear.analysis.ranking import Ranking
    from spear.errors import SpearError
    from spear.merging.controls import entry_from_spec, models_to_merge

    ranking = Ranking.from_document({"num_layers": 4, "order": [1, 3, 2, 0],
                                     "layers": [{"layer": i, "score": s} for i, s in enumerate([0.1, 0.9, 0.3, 0.5])]})
    lines = entry_from_spec({"policy": "lines", "controls": False})
    assert lines.controls is False and lines.policy.name == "lines"
    names = [m.name for m in models_to_merge(ranking, [entry_from_spec("balanced"), lines], 4, controls=True, random_seed=0)]
    assert names == ["balanced", "uniform@balanced", "balanced@random", "lines"]
    # a fit with one t for every layer has controls identical to itself: none are evaluated
    from spear.merging.plan import TMap

    tied = entry_from_spec({"policy": "optimized", "tie_layers": True})
    fitted = {"optimized_w1_tied": TMap.of_layers(dict.fromkeys(range(4), 0.4), 0.6)}
    assert [m.name for m in models_to_merge(ranking, [tied], 4, controls=True, random_seed=0, fitted=fitted)] == [
        "optimized_w1_tied"]
    with pytest.raises(SpearError, match="controls='no' must be true or false"):
        entry_from_spec({"policy": "lines", "controls": "no"})


def test_an_entry_ranked_by_its_own_impact_is_checked_before_anything_runs():
    from spear.errors import SpearError
    from spear.merging.controls import entry_from_spec

    entry = entry_from_spec({"policy": "balanced", "impact": "grad_delta", "non_layer_t": 0.5})
    assert entry.impact.name == "grad_delta" and entry.policy.non_layer_t == 0.5 and entry.label == "balanced_grad_delta"
    with pytest.raises(SpearError, match="policy=lines uses no ranking"):
        entry_from_spec({"policy": "lines", "impact": "grad_delta"})
    with pytest.raises(SpearError, match="impact needs `name: <one of"):
        entry_from_spec({"policy": "balanced", "impact": "nope"})
