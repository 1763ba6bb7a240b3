"""Shared plumbing of the Hydra entry points: schema registration, validation, one-line errors.

Every entry point is ``main = hydra_entry("<stage>", "<module>:<function>")``: Hydra composes
``conf/<stage>.yaml`` (the schema's options are registered first), :func:`spear.config.validate`
turns it into the stage's typed run config, and the stage function runs on it. A
:class:`SpearError` becomes one line ``error: ...`` with exit code 2. Before Hydra runs, the command line is
composed as Hydra will compose it and every callable it names is checked against the allow-list
(:mod:`spear.config.targets`): a config file is no way to run code. A run dir that this process
created and that holds nothing but Hydra's bookkeeping afterwards is removed; a dir that existed
before the run (``hydra.run.dir=<existing dir>``) is never removed, and the ``.hydra/`` record a
failing run wrote over is put back. A run dir named on the command line has one spear process at a
time (``.spear-run.lock`` inside it, taken before Hydra writes there): a second one fails fast.
The extra processes a distributed launcher starts (Lightning's DDP re-runs the command once per
rank) work in rank 0's run dir: they neither lock it nor clean it up.
"""

from __future__ import annotations

import importlib
import logging
import os
import shutil
import sys
from collections.abc import Callable
from pathlib import Path

from spear.errors import SpearError
from spear.io.location import HYDRA_RECORD as HYDRA_SUBDIR
from spear.io.location import RUN_LOCK, check_run_dir, machine_fault
from spear.paths import CONF_DIR

log = logging.getLogger("spear")


def _set_offline_defaults() -> None:
    """Nothing leaves the machine unless the user asks: hub offline, W&B offline."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("WANDB_MODE", "offline")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
    os.environ.setdefault("DO_NOT_TRACK", "1")


def _requested_run_dir(argv: list[str]) -> Path | None:
    """The run dir named on the command line (``hydra.run.dir=...``), when it is a plain path."""
    for arg in argv:
        if arg.startswith("hydra.run.dir="):
            value = arg.split("=", 1)[1]
            return None if "${" in value else Path(value).expanduser().resolve()
    return None


def _secondary_rank() -> bool:
    """Whether a launcher started this process for a rank other than 0 (rank 0 holds the run dir)."""
    return any(os.environ.get(var, "0") not in ("", "0") for var in ("RANK", "LOCAL_RANK", "NODE_RANK"))


def _is_output_lock(name: str) -> bool:
    """An output's writer lock (``.model.lock``, :func:`spear.io.atomic.exclusive`): bookkeeping, not output."""
    return name.startswith(".") and name.endswith(".lock")


def _remove_if_only_bookkeeping(run_dir: Path, task_name: str) -> None:
    """Remove ``run_dir`` when all it holds is what Hydra and this CLI wrote for this run."""
    ours = {HYDRA_SUBDIR, f"{task_name}.log", RUN_LOCK}
    if run_dir.is_dir() and all(entry.name in ours or _is_output_lock(entry.name) for entry in run_dir.iterdir()):
        shutil.rmtree(run_dir, ignore_errors=True)


def _snapshot(folder: Path) -> dict[str, bytes] | None:
    """The files of ``folder`` (Hydra's record of an earlier run), or ``None`` when there is none."""
    if not folder.is_dir():
        return None
    return {f.name: f.read_bytes() for f in folder.iterdir() if f.is_file()}


def _restore(folder: Path, files: dict[str, bytes] | None) -> None:
    """Put back the ``.hydra/`` of an earlier run that a failing run overwrote (or remove the new one)."""
    if files is None:
        shutil.rmtree(folder, ignore_errors=True)
        return
    for f in folder.iterdir() if folder.is_dir() else ():
        if f.is_file() and f.name not in files:
            f.unlink()
    folder.mkdir(exist_ok=True)
    for name, data in files.items():
        (folder / name).write_bytes(data)


MULTIRUN_FLAGS = ("-m", "--multirun")


def _config_overrides(argv: list[str]) -> list[str]:
    return [arg for arg in argv if not arg.startswith("-")
            and not arg.split("=", 1)[0].lstrip("+~").startswith(("hydra.", "hydra/"))]


def _user_overrides(argv: list[str]) -> list[str] | None:
    """The config overrides of a single run, or ``None`` when Hydra's flags (``-m``, ``--cfg``) are used."""
    if any(arg.startswith("-") for arg in argv):
        return None
    return _config_overrides(argv)


def _sweep_jobs(argv: list[str]) -> list[list[str]]:
    """The overrides of every job of a command-line multirun (``-m merge=slerp,linear``); none for other
    Hydra flags (``--cfg``, ``--help``), which compose nothing to run."""
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException

    flags = [arg for arg in argv if arg.startswith("-")]
    if not flags or any(flag not in MULTIRUN_FLAGS for flag in flags):
        return []
    try:
        parsed = OverridesParser.create().parse_overrides(_config_overrides(argv))
        return BasicSweeper.split_arguments(parsed, None)[0]
    except HydraException as err:
        raise SpearError(f"the sweep does not parse: {str(err).strip().splitlines()[0]}; see Hydra's override grammar") from None


def _check_default_dir(cfg) -> None:
    """The run's (or sweep's) dir that Hydra will create from the config: writable, not a file."""
    from omegaconf import OmegaConf

    key = "hydra.sweep.dir" if str(OmegaConf.select(cfg, "hydra.mode", default="")).endswith("MULTIRUN") else "hydra.run.dir"
    try:
        path = OmegaConf.select(cfg, key, throw_on_missing=True)
    except Exception:  # an interpolation only a running Hydra resolves: Hydra checks it then
        return
    if path:
        check_run_dir(Path(str(path)), f"{key} (under paths.log_dir)", explicit=False)


def _user_fault(exc: BaseException) -> SpearError | None:
    """The one line for what the machine or the config caused: a disk fault, or a target Hydra refuses to build
    (its block list, a wrong argument); ``None`` for a bug, which keeps its traceback."""
    from hydra.errors import InstantiationException

    if isinstance(exc, InstantiationException):
        lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
        return SpearError(f"{lines[0] if lines else type(exc).__name__}; fix or remove that _target_ in the config")
    return machine_fault(exc)


def _fail(err: SpearError) -> None:
    print(f"error: {err}", file=sys.stderr)
    sys.exit(2)


def _stage_function(target: str) -> Callable:
    module, _, name = target.partition(":")
    return getattr(importlib.import_module(module), name)


def hydra_entry(stage: str, target: str) -> Callable[[], None]:
    """The ``main()`` of a stage: Hydra CLI, validation, ``target`` (``module:function``) on the typed config."""
    import hydra
    from hydra.core.hydra_config import HydraConfig

    from spear.config import register, validate
    from spear.config.store import check_overrides
    from spear.config.targets import check_command_line
    from spear.io.atomic import exclusive

    register()
    earlier_record: dict[Path, dict[str, bytes] | None] = {}  # pre-existing run dir -> its .hydra/ files

    @hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name=stage)
    def _main(cfg) -> None:
        run_dir = Path(HydraConfig.get().runtime.output_dir).resolve()
        try:
            _stage_function(target)(validate(cfg, stage))
        except BaseException as exc:  # a bug's traceback too must not cost an earlier run its record
            err = exc if isinstance(exc, SpearError) else _user_fault(exc)
            logging.shutdown()
            if run_dir in earlier_record:
                _restore(run_dir / HYDRA_SUBDIR, earlier_record[run_dir])
                if earlier_record[run_dir] is None and err is not None:  # the user's empty dir: left as found
                    (run_dir / f"{cfg.task_name}.log").unlink(missing_ok=True)
            elif err is not None and not _secondary_rank():  # the run dir is rank 0's to keep or clean up
                _remove_if_only_bookkeeping(run_dir, str(cfg.task_name))
            if err is None:
                raise
            _fail(err)

    def main() -> None:
        _set_offline_defaults()
        overrides = _user_overrides(sys.argv[1:])
        try:  # a misspelt key or option, or a callable off the allow-list, is one line before Hydra creates
            # a run dir or instantiates anything (a sweep's jobs included)
            for job in [overrides] if overrides is not None else _sweep_jobs(sys.argv[1:]):
                check_overrides(stage, job)
            planned = check_command_line(stage, sys.argv[1:], _main)
            requested = None if _secondary_rank() else _requested_run_dir(sys.argv[1:])
            if requested is not None:
                check_run_dir(requested)
            elif planned is not None and not _secondary_rank():
                _check_default_dir(planned)
        except SpearError as err:
            _fail(err)
        if requested is None:
            _main()
            return
        if requested.exists():
            earlier_record[requested] = _snapshot(requested / HYDRA_SUBDIR)
        try:
            with exclusive(requested, lock=requested / RUN_LOCK):
                _main()
        except SpearError as err:  # the run dir is held by another process: nothing was written
            _fail(err)

    return main
