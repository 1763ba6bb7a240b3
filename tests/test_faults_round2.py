"""Reliability, second round (issue 23, parts 3-5): a user's files are never changed, the machine's faults
and hostile inputs are one line with exit code 2 and nothing left behind, numbers and provenance are honest.

Each test pins a reproduction that failed before the fix (a traceback, exit 1, a changed user file, a
leftover, a pooled interval)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from spear.errors import SpearError
from spear.paths import PROJECT_ROOT


def _cli(module: str, *args: str, env: dict[str, str] | None = None, code: str | None = None):
    """``python -m spear.<module> args`` (or ``code`` run first in the same process, to inject a fault)."""
    argv = [sys.executable, "-m", f"spear.{module}", *args] if code is None else [
        sys.executable, "-c", f"{code}\nimport sys, runpy\nsys.argv = ['spear.{module}', *{list(args)!r}]\n"
        f"runpy.run_module('spear.{module}', run_name='__main__')"]
    return subprocess.run(argv, capture_output=True, text=True, cwd=PROJECT_ROOT, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})})


def _one_error_line(proc) -> str:
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert len(errors) == 1 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    return errors[0]


def _merge_args(model: Path, run_dir: Path, *extra: str) -> list[str]:
    return [f"base={model}", f"adapted={model}", "policy=uniform", "logger=none", "progress=false",
            f"hydra.run.dir={run_dir}", *extra]


def _corpus(tmp_path: Path) -> Path:
    path = tmp_path / "corpus.txt"
    path.write_text("\n\n".join("ledger debit credit balance asset liability " * 12 for _ in range(20)))
    return path


# ------------------------------------------------------------------------ 3. a user's files are never changed


def test_a_run_dir_of_the_users_files_is_refused_and_left_byte_identical(tiny_llama_dir, tmp_path):
    user_dir = tmp_path / "results"
    user_dir.mkdir()
    (user_dir / "merge.log").write_text("my notes\n")
    (user_dir / "README.md").write_text("# mine\n")
    proc = _cli("merge", *_merge_args(tiny_llama_dir, user_dir))
    assert "holds files no spear run wrote (README.md, merge.log)" in _one_error_line(proc)
    assert sorted(p.name for p in user_dir.iterdir()) == ["README.md", "merge.log"]
    assert (user_dir / "merge.log").read_text() == "my notes\n"


def test_a_failing_run_in_an_empty_dir_of_the_users_leaves_it_empty(tiny_llama_dir, tmp_path):
    user_dir = tmp_path / "empty"
    user_dir.mkdir()
    _one_error_line(_cli("merge", *_merge_args(tiny_llama_dir, user_dir, "policy=top_k", "policy.k=99")))
    assert [p.name for p in user_dir.iterdir() if p.name != ".spear-run.lock"] == []


def test_an_unhandled_error_puts_back_the_earlier_runs_record(tiny_llama_dir, tmp_path):
    run_dir = tmp_path / "run"
    assert _cli("merge", *_merge_args(tiny_llama_dir, run_dir)).returncode == 0
    record = {p.name: p.read_bytes() for p in (run_dir / ".hydra").iterdir()}
    bug = ("import spear.merging.stage as s\n"
           "def boom(*a, **k):\n    raise RuntimeError('a bug')\n"
           "s.merge_checkpoints = boom")
    proc = _cli("merge", *_merge_args(tiny_llama_dir, run_dir, "overwrite=true", "policy.t=0.25"), code=bug)
    assert proc.returncode == 1 and "RuntimeError: a bug" in proc.stderr  # a bug keeps its traceback
    assert {p.name: p.read_bytes() for p in (run_dir / ".hydra").iterdir()} == record


def _collate_job(root: Path) -> Path:
    run = root / "job"
    run.mkdir(parents=True)
    models = [{"name": n, "kind": "baseline", "seeds": [1234],
               "metrics": {"general_retention": 1.0, "domain_gain_preservation": g, "mean_t": t}}
              for n, g, t in (("base", 0.0, 1.0), ("adapted", 1.0, 0.0))]
    (run / "summary.json").write_text(json.dumps({"seeds": [1234], "models": models, "relations": [],
                                                  "cost": {"cpt_seconds": 1.0, "wall_seconds": 2.0}}))
    return run


def test_collate_never_replaces_a_readme_it_did_not_write(tmp_path):
    run = _collate_job(tmp_path / "runs")
    out = tmp_path / "record"
    out.mkdir()
    (out / "README.md").write_text("# my write-up\n")
    args = [str(run), "--experiment", "demo", "--out", str(out)]
    proc = _cli("tracking.collate", *args)
    assert "README.md that collate did not write; pass --overwrite" in _one_error_line(proc)
    assert (out / "README.md").read_text() == "# my write-up\n" and sorted(p.name for p in out.iterdir()) == ["README.md"]
    assert _cli("tracking.collate", *args, "--overwrite").returncode == 0
    assert (out / "README.md").read_text().startswith("# demo\n")
    assert _cli("tracking.collate", *args).returncode == 0  # its own record: re-collated in place


@pytest.mark.parametrize(("setup", "message"), [
    (lambda root: root.mkdir(), "no pipeline run in"),
    (lambda root: (root / "job").mkdir(parents=True) or (root / "job" / "summary.json").write_text("{\"models\": 3"),
     "summary.json is not a pipeline summary"),
    (lambda root: (root / "job").mkdir(parents=True) or (root / "job" / "summary.json").write_text("{\"models\": []}"),
     "summary.json is not a pipeline summary"),
])
def test_collate_without_readable_runs_is_one_line(tmp_path, setup, message):
    root = tmp_path / "runs"
    setup(root)
    proc = _cli("tracking.collate", str(root), "--experiment", "demo", "--out", str(tmp_path / "out"))
    assert message in _one_error_line(proc)
    assert not (tmp_path / "out").exists()


# ------------------------------------------------------------------------ 4. faults of the machine


def test_a_run_dir_that_is_a_file_is_one_line(tiny_llama_dir, tmp_path):
    taken = tmp_path / "taken"
    taken.write_text("a file\n")
    assert "is a file; choose a directory path" in _one_error_line(_cli("merge", *_merge_args(tiny_llama_dir, taken)))
    line = _one_error_line(_cli("merge", *_merge_args(tiny_llama_dir, taken / "sub")))
    assert f"lies under {taken}, which is a file" in line
    assert taken.read_text() == "a file\n"


def _make_read_only(folder: Path) -> bool:
    """Read-only for this process: permissions, and the immutable flag where permissions do not bind (root)."""
    folder.chmod(0o555)
    if not os.access(folder, os.W_OK) or shutil.which("chattr") is None:
        return not os.access(folder, os.W_OK)
    return subprocess.run(["chattr", "+i", str(folder)], capture_output=True).returncode == 0


def test_a_read_only_output_dir_is_one_line(tiny_llama_dir, tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir()
    if not _make_read_only(locked):
        pytest.skip("this machine cannot make a dir read-only for this user")
    try:
        line = _one_error_line(_cli("merge", *_merge_args(tiny_llama_dir, locked / "run")))
        assert "cannot be written" in line and str(locked) in line
        line = _one_error_line(_cli("merge", *_merge_args(tiny_llama_dir, tmp_path / "x")[:-1], f"paths.log_dir={locked}"))
        assert "paths.log_dir" in line and "cannot be written" in line
    finally:
        subprocess.run(["chattr", "-i", str(locked)], capture_output=True)
        locked.chmod(0o755)
    assert list(locked.iterdir()) == []


def test_no_space_left_is_one_line_and_the_run_leaves_nothing(tiny_llama_dir, tmp_path):
    full_disk = ("import errno, os\nimport spear.io.writer as w\n"
                 "def full(self, *a, **k):\n    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))\n"
                 "w.ShardedSafetensorsWriter.write = full")
    run_dir = tmp_path / "run"
    line = _one_error_line(_cli("merge", *_merge_args(tiny_llama_dir, run_dir), code=full_disk))
    assert line.startswith("error: no space left on the device") and "hydra.run.dir" in line
    assert not run_dir.exists()


def test_a_target_on_hydras_block_list_is_one_line_even_when_its_module_is_allowed(tiny_llama_dir, tmp_path):
    victim = tmp_path / "victim"
    victim.mkdir()
    run_dir = tmp_path / "run"
    proc = _cli("train", "model=tiny_llama", f"model.ref={tiny_llama_dir}", "data=text", f"data.paths=[{_corpus(tmp_path)}]",
                "logger=none", "trainer.max_steps=1", f"hydra.run.dir={run_dir}", "+callbacks.x._target_=shutil.rmtree",
                f"+callbacks.x.path={victim}", env={"SPEAR_ALLOWED_TARGETS": "shutil"})
    assert "'shutil.rmtree' is blocklisted" in _one_error_line(proc)
    assert victim.is_dir() and not run_dir.exists()


def _hostile_checkpoint(path: Path) -> Path:
    import torch

    class Payload:
        def __reduce__(self):
            return (os.mkdir, (str(path.parent / "PAYLOAD_RAN"),))

    torch.save({"state_dict": Payload(), "pytorch-lightning_version": "2.6.0"}, path)
    return path


def _bare_state_dict(model: Path, path: Path) -> Path:
    import torch
    from safetensors.torch import load_file

    torch.save(load_file(model / "model.safetensors"), path)
    return path


@pytest.mark.parametrize(("make", "message"), [
    (lambda model, d: _hostile_checkpoint(d / "last.ckpt"), "does not load weights-only"),
    (lambda model, d: _bare_state_dict(model, d / "pytorch_model.bin"), "is not a Lightning checkpoint"),
])
def test_a_checkpoint_that_needs_pickle_is_one_line_and_runs_nothing(tiny_llama_dir, tmp_path, make, message):
    ckpt = make(tiny_llama_dir, tmp_path)
    run_dir = tmp_path / "run"
    proc = _cli("train", "model=tiny_llama", f"model.ref={tiny_llama_dir}", "data=text", f"data.paths=[{_corpus(tmp_path)}]",
                "logger=none", "trainer.max_steps=1", f"hydra.run.dir={run_dir}", f"ckpt_path={ckpt}")
    line = _one_error_line(proc)
    assert f"ckpt_path={ckpt}" in line and message in line
    assert not (tmp_path / "PAYLOAD_RAN").exists() and not run_dir.exists()


def test_a_finance_pack_file_that_is_not_there_names_its_key(tiny_llama_dir, tmp_path):
    run_dir = tmp_path / "run"
    proc = _cli("evaluate", "model=tiny_llama", f"model.ref={tiny_llama_dir}", "eval=perplexity", "logger=none",
                "progress=false", f"eval.finance_pack.fpb={tmp_path / 'nowhere.txt'}", f"hydra.run.dir={run_dir}")
    assert "is not a file; fix eval.finance_pack.fpb" in _one_error_line(proc)
    assert not run_dir.exists()


def test_overwriting_a_symlinked_output_replaces_the_link_and_leaves_no_backup(tmp_path):
    from spear.io.atomic import atomic_dir

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "weights").write_text("the user's\n")
    out = tmp_path / "run" / "model"
    out.parent.mkdir()
    out.symlink_to(elsewhere, target_is_directory=True)
    with atomic_dir(out, overwrite=True) as tmp:
        (tmp / "weights").write_text("new\n")
    assert not out.is_symlink() and (out / "weights").read_text() == "new\n"
    assert sorted(p.name for p in out.parent.iterdir() if not p.name.endswith(".lock")) == ["model"]
    assert (elsewhere / "weights").read_text() == "the user's\n"  # the link's target is not ours to change


# ------------------------------------------------------------------------ 5. numbers and provenance


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), None])
def test_a_layer_without_a_finite_score_is_an_error_naming_it_and_the_proxy(bad):
    from spear.analysis.ranking import Ranking

    doc = {"impact": {"name": "swci"}, "layers": [{"layer": i, "score": s} for i, s in enumerate([0.3, bad, 0.1, 0.2])]}
    with pytest.raises(SpearError, match="layer 1 has no finite score .* under impact=swci") as err:
        Ranking.from_document(doc)
    assert "\n" not in str(err.value)


def test_a_block_longer_than_the_models_positions_is_refused(compose, tiny_llama_dir, tmp_path):
    from spear.cpt.stage import run_train

    cfg = compose("train", ["model=tiny_llama", f"model.ref={tiny_llama_dir}", "data=text",
                            f"data.paths=[{_corpus(tmp_path)}]", "data.block_size=4096", "trainer.max_steps=1"])
    with pytest.raises(SpearError, match=r"data.block_size=4096 is longer than the model's 512 positions.*data.block_size<=512"):
        run_train(cfg)
    assert not (tmp_path / "run" / "model").exists()


def test_a_model_card_carries_no_home_or_run_paths(tiny_llama_dir, tmp_path):
    run_dir = tmp_path / "run"
    home = str(tmp_path.parent)
    proc = _cli("merge", *_merge_args(tiny_llama_dir, run_dir), env={"HOME": home})
    assert proc.returncode == 0, proc.stderr[-2000:]
    card = (run_dir / "model" / "README.md").read_text()
    assert home + "/" not in card and str(run_dir) not in card
    assert "~/" in card  # the tiny model's path, under the home dir, as ~/...


def test_custom_code_travels_only_with_trust_remote_code(tiny_llama_dir, tmp_path):
    adapted = tmp_path / "adapted"
    shutil.copytree(tiny_llama_dir, adapted)
    (adapted / "modeling_custom.py").write_text("raise SystemExit('ran')\n")
    args = [f"base={tiny_llama_dir}", f"adapted={adapted}", "policy=uniform", "logger=none", "progress=false"]
    assert _cli("merge", *args, f"hydra.run.dir={tmp_path / 'plain'}").returncode == 0
    assert not (tmp_path / "plain" / "model" / "modeling_custom.py").exists()
    assert "custom code not copied: `modeling_custom.py`" in (tmp_path / "plain" / "model" / "README.md").read_text()
    assert _cli("merge", *args, "model.trust_remote_code=true", f"hydra.run.dir={tmp_path / 'trusted'}").returncode == 0
    assert (tmp_path / "trusted" / "model" / "modeling_custom.py").exists()
    assert "custom code copied (model.trust_remote_code=true)" in (tmp_path / "trusted" / "model" / "README.md").read_text()


def test_two_models_under_one_name_are_kept_apart_and_a_repeat_is_evaluated_once():
    from spear.pipeline import unique_names

    frontier = {"name": "uniform_t0.5", "kind": "frontier", "tmap": {"t": 0.5, "non_layer_t": 0.5}, "seed": 1}
    policy = {"name": "uniform_t0.5", "kind": "policy", "tmap": {"t": 0.5, "non_layer_t": 0.0}, "seed": 1}
    same = {**frontier, "kind": "policy"}
    assert [e["name"] for e in unique_names([frontier, policy])] == ["uniform_t0.5", "uniform_t0.5 [policy]"]
    assert [e["kind"] for e in unique_names([frontier, same])] == ["frontier"]


def test_an_interval_never_pools_two_models_of_one_seed():
    from spear.tracking.summary import aggregate_seeds

    one_seed = [[{"name": "m", "kind": "policy", "seed": 1234, "metrics": {"nll/domain": 2.0}},
                 {"name": "m", "kind": "frontier", "seed": 1234, "metrics": {"nll/domain": 2.5}}]]
    with pytest.raises(SpearError, match="same seed"):
        aggregate_seeds(one_seed)
    two_seeds = [[{"name": "m", "kind": "policy", "seed": s, "metrics": {"nll/domain": v}}] for s, v in ((1, 2.0), (2, 2.5))]
    assert aggregate_seeds(two_seeds)[0]["ci95"]["nll/domain"] is not None
