"""The entry points' plumbing: one-line errors with exit code 2, and run dirs that are never the user's to lose."""

from __future__ import annotations

import subprocess
import sys

import pytest

from spear.paths import PROJECT_ROOT


def _train(tmp_path, run_dir, *extra):
    empty = tmp_path / "empty.txt"
    empty.write_text("   \n")
    return subprocess.run(
        [sys.executable, "-m", "spear.train", "model=tiny_llama", "data=text", f"data.paths=[{empty}]", "logger=none",
         f"hydra.run.dir={run_dir}", *extra],
        capture_output=True, text=True, cwd=PROJECT_ROOT, timeout=300,
    )


def test_a_failing_run_in_an_existing_dir_deletes_nothing(tmp_path):
    """A user's dir that holds only logs (what Hydra writes too) is refused before anything is written to it."""
    user_dir = tmp_path / "my_notes"
    user_dir.mkdir()
    (user_dir / "experiment.log").write_text("three weeks of notes\n")
    (user_dir / "train.log").write_text("an older run's log\n")
    proc = _train(tmp_path, user_dir)
    assert proc.returncode == 2 and proc.stderr.strip().splitlines()[-1].startswith("error:")
    assert (user_dir / "experiment.log").read_text() == "three weeks of notes\n"
    assert (user_dir / "train.log").read_text() == "an older run's log\n"  # not appended to
    assert "holds files no spear run wrote" in proc.stderr


def test_a_failing_run_removes_the_dir_it_created(tmp_path):
    run_dir = tmp_path / "new_run"
    proc = _train(tmp_path, run_dir)
    assert proc.returncode == 2 and not run_dir.exists()


def test_a_bad_value_is_one_line_naming_the_key(tmp_path):
    proc = _train(tmp_path, tmp_path / "run", "optim.lr=abc")
    lines = [line for line in proc.stderr.strip().splitlines() if line.strip()]
    assert proc.returncode == 2 and lines == ["error: optim.lr='abc': input should be a valid number, unable to parse "
                                              "string as a number; fix optim.lr"]
    assert not (tmp_path / "run").exists()


def _stage(stage, run_dir, *overrides):
    quiet = [] if stage == "train" else ["progress=false"]  # train reports through Lightning's own bar
    return subprocess.run([sys.executable, "-m", f"spear.{stage}", "logger=none", *quiet,
                           f"hydra.run.dir={run_dir}", *overrides],
                          capture_output=True, text=True, cwd=PROJECT_ROOT, timeout=300)


def _nan_model(src, dest):
    import shutil

    from safetensors.torch import load_file, save_file

    shutil.copytree(src, dest)
    tensors = load_file(dest / "model.safetensors")
    tensors["model.layers.0.self_attn.q_proj.weight"][0, 0] = float("nan")
    save_file(tensors, dest / "model.safetensors", metadata={"format": "pt"})
    return dest


FAULTS = {
    # case: (stage, overrides given (tiny model dir, scratch dir), what the error line must name)
    "evaluate_nan_weight": ("evaluate", lambda m, d: ["model=tiny_llama", f"model.ref={_nan_model(m, d / 'nan')}",
                                                      "eval=perplexity"], "q_proj.weight holds NaN"),
    "merge_ranking_is_a_list": ("merge", lambda m, d: [f"base={m}", f"adapted={m}", "policy=top_k",
                                                       f"ranking={_write(d / 'r.json', '[1, 2]')}"], "ranking"),
    "merge_fractional_k": ("merge", lambda m, d: [f"base={m}", f"adapted={m}", "policy=top_k", "policy.k=2.7"],
                           "policy.k"),
    "analyze_unknown_impact": ("analyze", lambda m, d: [f"base={m}", f"adapted={m}", "impact.name=nosuch"], "impact.name"),
    "train_truncated_checkpoint": ("train", lambda m, d: ["model=tiny_llama", f"model.ref={m}", "data=text",
                                                         f"data.paths=[{_write(d / 'c.txt', 'ledger debit credit ' * 400)}]",
                                                         f"ckpt_path={_write(d / 'last.ckpt', 'PK not a zip')}"],
                                   "ckpt_path"),
}


def _write(path, text):
    path.write_text(text)
    return path


@pytest.mark.parametrize("case", sorted(FAULTS))
def test_a_fault_is_one_line_exit_2_and_the_run_dir_keeps_only_what_was_there(case, tiny_llama_dir, tmp_path):
    """The fault table at the command line: exit code 2, one ``error:`` line naming the key or file, no
    partial output, and the user's files and the earlier run's ``.hydra/`` record untouched."""
    stage, overrides, names = FAULTS[case]
    run_dir = tmp_path / "run"
    (run_dir / ".hydra").mkdir(parents=True)
    (run_dir / "notes.md").write_text("mine\n")
    (run_dir / ".hydra" / "overrides.yaml").write_text("- an earlier run\n")
    proc = _stage(stage, run_dir, *overrides(tiny_llama_dir, tmp_path))
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert len(errors) == 1 and names in errors[0] and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert (run_dir / "notes.md").read_text() == "mine\n"
    assert [p.name for p in (run_dir / ".hydra").iterdir()] == ["overrides.yaml"]
    assert (run_dir / ".hydra" / "overrides.yaml").read_text() == "- an earlier run\n"
    assert {p.name for p in run_dir.iterdir()} <= {"notes.md", ".hydra", f"{stage}.log", ".spear-run.lock"}


def test_a_second_process_in_a_held_run_dir_fails_fast_and_writes_nothing(tiny_llama_dir, tmp_path):
    import os

    from spear.io.atomic import exclusive

    run_dir = tmp_path / "run"
    with exclusive(run_dir, lock=run_dir / ".spear-run.lock"):  # as a live run of another process holds it
        proc = _stage("merge", run_dir, f"base={tiny_llama_dir}", f"adapted={tiny_llama_dir}", "policy=uniform")
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1] == (f"error: {run_dir} is being written by pid {os.getpid()}; "
                                                    "wait for it or choose another hydra.run.dir")
    assert {p.name for p in run_dir.iterdir()} == {".spear-run.lock"}


def test_every_stage_records_the_config_that_made_its_outputs(tiny_llama_dir, tmp_path):
    import yaml

    run_dir = tmp_path / "run"
    proc = _stage("merge", run_dir, f"base={tiny_llama_dir}", f"adapted={tiny_llama_dir}", "policy=uniform",
                  "policy.t=0.25")
    assert proc.returncode == 0, proc.stderr[-2000:]
    saved = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert saved["policy"]["t"] == 0.25 and saved["task_name"] == "merge"
    assert "command: `python -m spear.merge logger=none progress=false" in (run_dir / "model" / "README.md").read_text()
    again = _stage("merge", run_dir, f"base={tiny_llama_dir}", f"adapted={tiny_llama_dir}", "policy=uniform",
                   "policy.t=0.75")  # refused: the output exists
    assert again.returncode == 2
    assert yaml.safe_load((run_dir / "config.yaml").read_text())["policy"]["t"] == 0.25
    assert "policy.t=0.25" in (run_dir / ".hydra" / "overrides.yaml").read_text()


@pytest.mark.parametrize(("override", "line"), [
    ("optim.lrr=1", "error: optim.lrr is not a key of spear.train; fix its spelling (docs/CONFIG.md lists every key and option)"),
    ("trainer=nosuch", "error: trainer=nosuch is not an option; choose one of "),
    ("optim.lr=[1", "error: the overrides do not parse: "),
])
def test_a_misspelt_key_or_option_is_one_line_before_any_run_dir(override, line, tmp_path):
    proc = _train(tmp_path, tmp_path / "run", override)
    lines = [text for text in proc.stderr.strip().splitlines() if text.strip()]
    assert proc.returncode == 2 and len(lines) == 1 and lines[0].startswith(line), proc.stderr
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize(("sweep", "line"), [
    ("merge=slerp,nosuch", "error: merge=nosuch is not an option; choose one of "),
    ("policy.tt=0.1,0.2", "error: policy.tt is not a key of spear.merge"),
    ("policy.t=[0.1", "error: the sweep does not parse: "),
])
def test_a_bad_job_of_a_multirun_is_one_line_before_any_job_runs(sweep, line, tmp_path):
    proc = subprocess.run([sys.executable, "-m", "spear.merge", "-m", "logger=none", f"hydra.sweep.dir={tmp_path / 'sweep'}",
                           "adapted=nowhere", "policy=uniform", sweep], capture_output=True, text=True,
                          cwd=PROJECT_ROOT, timeout=300)
    lines = [text for text in proc.stderr.strip().splitlines() if text.strip()]
    assert proc.returncode == 2 and len(lines) == 1 and lines[0].startswith(line), proc.stderr
    assert not (tmp_path / "sweep").exists()
