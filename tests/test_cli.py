"""The entry points' plumbing: one-line errors with exit code 2, and run dirs that are never the user's to lose."""

from __future__ import annotations

import subprocess
import sys

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
    """A user's dir that holds only logs (what Hydra writes too) survives a failing run pointed at it."""
    user_dir = tmp_path / "my_notes"
    user_dir.mkdir()
    (user_dir / "experiment.log").write_text("three weeks of notes\n")
    (user_dir / "train.log").write_text("an older run's log\n")
    proc = _train(tmp_path, user_dir)
    assert proc.returncode == 2 and proc.stderr.strip().splitlines()[-1].startswith("error:")
    assert (user_dir / "experiment.log").read_text() == "three weeks of notes\n"
    assert (user_dir / "train.log").read_text().startswith("an older run's log\n")


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
