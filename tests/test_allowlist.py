"""No code from a config (issue 23, part 1): every callable a composed config names is on the allow-list,
checked before Hydra creates a dir or instantiates anything; SPEAR_ALLOWED_TARGETS, outside the config, adds more."""

from __future__ import annotations

import importlib
import subprocess
import sys
from pathlib import Path

import pytest

from spear.cli import hydra_entry  # the module of the entry points' task function (what Hydra is given)
from spear.config.stages import STAGE_RUNS
from spear.config.targets import ENV_VAR, check_command_line, check_target, named_callables
from spear.errors import SpearError
from spear.paths import CONF_DIR, PROJECT_ROOT


def _refused(stage: str, argv: list[str], key: str, target: str) -> str:
    with pytest.raises(SpearError) as err:
        check_command_line(stage, argv, hydra_entry)
    message = str(err.value)
    assert message.startswith(f"{key}={target} is not allowed") and "\n" not in message, message
    assert ENV_VAR in message
    return message


def _experiment(tmp_path: Path, name: str, text: str) -> Path:
    config_dir = tmp_path / "my_conf"
    (config_dir / "experiment").mkdir(parents=True, exist_ok=True)
    (config_dir / "experiment" / f"{name}.yaml").write_text("# @package _global_\n" + text)
    return config_dir


def test_a_callable_on_the_command_line_is_one_line_before_anything_runs(tmp_path, word_corpus):
    """The reproduction: `+callbacks.x._target_=shutil.copyfile` copied a file; now exit 2, one line naming the
    key and the target, no copy and no run dir."""
    src, dst, run_dir = tmp_path / "A.txt", tmp_path / "B.txt", tmp_path / "run"
    src.write_text("a user's file\n")
    proc = subprocess.run(
        [sys.executable, "-m", "spear.train", "model=tiny_llama", "data=text", f"data.paths=[{word_corpus(200, 0)}]",
         "logger=none", "trainer.max_steps=1", f"hydra.run.dir={run_dir}", "+callbacks.x._target_=shutil.copyfile",
         f"+callbacks.x.src={src}", f"+callbacks.x.dst={dst}"],
        capture_output=True, text=True, cwd=PROJECT_ROOT, timeout=300)
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr[-2000:]
    assert lines[0].startswith("error: callbacks.x._target_=shutil.copyfile is not allowed"), lines[0]
    assert not dst.exists() and not run_dir.exists()


def test_a_pickle_loader_in_an_experiment_file_is_refused(tmp_path):
    config_dir = _experiment(tmp_path, "evil", "callbacks:\n  loader:\n    _target_: torch.load\n    f: payload.pkl\n")
    _refused("train", ["--config-dir", str(config_dir), "+experiment=evil"], "callbacks.loader._target_", "torch.load")
    _refused("pipeline", ["--config-dir", str(config_dir), "+experiment=evil"], "callbacks.loader._target_", "torch.load")


def test_a_callable_nested_in_a_list_is_refused(tmp_path):
    config_dir = _experiment(tmp_path, "nested", (
        "callbacks:\n  hooks:\n    _target_: pytorch_lightning.callbacks.LambdaCallback\n"
        "    on_fit_start:\n      - {_target_: os.system, command: 'touch pwned'}\n"))
    _refused("train", ["--config-dir", str(config_dir), "+experiment=nested"],
             "callbacks.hooks.on_fit_start.0._target_", "os.system")
    assert [key for key, _ in named_callables({"a": [{"b": [{"_target_": "x"}]}]})] == ["a.0.b.0._target_"]


def test_hydra_s_own_nodes_are_checked(tmp_path):
    """Hydra instantiates its callbacks and launcher (nested nodes included) and hands its logging config to
    dictConfig, which calls a handler's `()`: all before the task runs."""
    _refused("merge", ["+hydra.callbacks.x._target_=shutil.copyfile"], "hydra.callbacks.x._target_", "shutil.copyfile")
    _refused("pipeline", ["-m", "hydra/launcher=joblib", "+hydra.launcher.x._target_=os.system"],
             "hydra.launcher.x._target_", "os.system")
    config_dir = _experiment(tmp_path, "logs", "hydra:\n  job_logging:\n    handlers:\n      x:\n"
                                               "        '()': shutil.copyfile\n        src: a\n        dst: b\n")
    _refused("evaluate", ["--config-dir", str(config_dir), "+experiment=logs"],
             "hydra.job_logging.handlers.x.()", "shutil.copyfile")


def test_every_job_of_a_sweep_is_checked_before_the_first_runs():
    _refused("merge", ["-m", "adapted=x", "+callbacks.x._target_=spear.cpt.callbacks.SpeedMonitor,os.system"],
             "callbacks.x._target_", "os.system")


def test_a_config_validated_by_any_path_is_checked(compose):
    """The second line: a job another sweeper composes reaches the stage through validate, which checks it too."""
    with pytest.raises(SpearError, match=r"^callbacks\.x\._target_=builtins\.exec is not allowed"):
        compose("train", ["model=tiny_llama", "+callbacks.x._target_=builtins.exec"])


@pytest.mark.parametrize(("target", "why"), [
    ("pytorch_lightning.callbacks.model_checkpoint.torch.load", r"\(it is torch\.serialization\.load\)"),
    ("spear.cpt.strategies._call_target", "not allowed"),  # private: calls whatever it is given
    ("spear.models.load_model", "not allowed"),  # spear as a whole is not on the list: this one unpickles
    ("logging.config.listen", "not allowed"),
    # a method's first argument can be an object the config builds: TorchCheckpointIO().load_checkpoint(path) unpickles
    ("pytorch_lightning.plugins.TorchCheckpointIO.load_checkpoint", "not a class or a module-level function"),
    ("pytorch_lightning.callbacks.model_checkpoint.os.system", "not a class or a module-level function"),
    ("spear.cpt.callbacks", "not a class or a module-level function"),
])
def test_names_that_reach_other_code_through_an_allowed_module_are_refused(target, why):
    with pytest.raises(SpearError, match=why):
        check_target("callbacks.x._target_", target)


def test_the_default_configs_of_every_stage_and_every_shipped_target_pass():
    for stage in STAGE_RUNS:
        check_command_line(stage, [], hydra_entry)
    for option in sorted(p.stem for p in (CONF_DIR / "trainer").glob("*.yaml")):
        check_command_line("train", [f"trainer={option}"], hydra_entry)
    for option in sorted(p.stem for p in (CONF_DIR / "logger").glob("*.yaml")):
        check_command_line("evaluate", [f"logger={option}"], hydra_entry)
    check_command_line("pipeline", ["-m", "hydra/launcher=joblib", "policy=balanced,aggressive"], hydra_entry)
    shipped = [line.split("_target_:", 1)[1].split("#")[0].strip()
               for path in CONF_DIR.rglob("*.yaml") for line in path.read_text().splitlines() if "_target_:" in line]
    assert "pytorch_lightning.Trainer" in shipped and "spear.cpt.strategies.deepspeed" in shipped
    for target in shipped:
        check_target("_target_", target)


@pytest.mark.parametrize("module", ["pytorch_lightning.callbacks", "pytorch_lightning.loggers",
                                    "pytorch_lightning.strategies", "pytorch_lightning.plugins"])
def test_lightning_s_families_are_allowed_as_exported(module):
    names = importlib.import_module(module).__all__
    for name in names:
        check_target("k", f"{module}.{name}")


def test_a_module_prefix_from_the_environment_is_allowed(monkeypatch):
    with pytest.raises(SpearError, match="export SPEAR_ALLOWED_TARGETS=shutil"):
        check_target("callbacks.x._target_", "shutil.copyfile")
    monkeypatch.setenv(ENV_VAR, "json, shutil")
    check_target("callbacks.x._target_", "shutil.copyfile")
    with pytest.raises(SpearError, match="not allowed"):  # a prefix is a whole module name, not a string prefix
        check_target("callbacks.x._target_", "shutilx.copy")
