"""No code from a config: every callable a config names is checked against an allow-list before anything runs.

Hydra's ``instantiate`` calls whatever a ``_target_`` names, and ``logging.config.dictConfig`` whatever a
``()`` or ``class`` names in Hydra's logging nodes (``hydra.job_logging``, ``hydra.hydra_logging``).
Configs and experiment files travel between teams, so a config may name only the callables spear's own
configs use and their kin (:data:`ALLOWED`). spear as a whole is not on the list: ``spear.`` would reach
``spear.models.load_model``, which unpickles with ``allow_pickle=true``; only the two modules that exist to be
targets are. A name is allowed when it is an entry or lies under one with no ``_private`` part below it,
and when it resolves to a class or a module-level function (not a method) defined under an entry too: a
module's imports are not its exports (``pytorch_lightning.callbacks.model_checkpoint.torch.load`` is
``torch.load``). Resolving a name imports
only modules under an entry. Who trusts more code names its module prefixes in ``$SPEAR_ALLOWED_TARGETS``
(comma-separated), outside any config, so a shared config file cannot unlock itself.
"""

from __future__ import annotations

import inspect
import os
from collections.abc import Callable, Iterator
from typing import Any

from spear.errors import SpearError
from spear.paths import CONF_DIR

ENV_VAR = "SPEAR_ALLOWED_TARGETS"

# Entry (a dotted name, or a module prefix of everything under it) -> why a config may name it.
ALLOWED: dict[str, str] = {
    "spear.cpt.callbacks": "spear's Lightning callbacks (conf/callbacks)",
    "spear.cpt.strategies": "spear's lazy strategy factories (trainer=deepspeed_*, fsdp)",
    "pytorch_lightning.Trainer": "the trainer group (conf/trainer)",
    "pytorch_lightning.trainer.trainer.Trainer": "where that class is defined",
    "pytorch_lightning.callbacks": "Lightning's callbacks (the callbacks group)",
    "pytorch_lightning.loggers": "Lightning's loggers (the logger group)",
    "pytorch_lightning.strategies": "Lightning's strategies (trainer.strategy)",
    "pytorch_lightning.plugins": "Lightning's precision, environment and checkpoint-IO plugins (trainer.plugins)",
    "lightning_fabric.plugins": "where several of those plugins are defined",
    "pytorch_lightning.profilers": "Lightning's profilers (trainer.profiler)",
    "hydra._internal.core_plugins": "Hydra's basic launcher and sweeper (hydra.launcher, hydra.sweeper)",
    "hydra_plugins": "installed Hydra launchers and sweepers (hydra/launcher=joblib, submitit)",
    "logging.StreamHandler": "Hydra's logging config (hydra.job_logging, hydra.hydra_logging)",
    "logging.FileHandler": "Hydra's logging config",
    "logging.NullHandler": "Hydra's logging config",
    "logging.Formatter": "Hydra's logging config",
    "logging.handlers.RotatingFileHandler": "log rotation",
    "logging.handlers.TimedRotatingFileHandler": "log rotation",
    "logging.handlers.WatchedFileHandler": "log rotation",
}

TARGET_KEY = "_target_"
LOGGING_NODES = ("hydra.job_logging.", "hydra.hydra_logging.")
LOGGING_KEYS = ("()", "class")  # the factory and the class of a dictConfig handler, formatter or filter


def allowed_entries() -> tuple[str, ...]:
    """The built-in entries and the module prefixes the user trusts in ``$SPEAR_ALLOWED_TARGETS``."""
    extra = (entry.strip() for entry in os.environ.get(ENV_VAR, "").split(","))
    return (*ALLOWED, *(entry for entry in extra if entry))


def _under(name: str, entries: tuple[str, ...], public: bool) -> bool:
    """Whether ``name`` is an entry or lies under one (``public``: with no ``_private`` part below it)."""
    for entry in entries:
        if name == entry:
            return True
        if name.startswith(entry + "."):
            rest = name[len(entry) + 1:].split(".")
            if not (public and any(part.startswith("_") for part in rest)):
                return True
    return False


def _refusal(key: str, target: Any, defined: str | None = None) -> SpearError:
    """The one line for a refused name; the fix names the module that holds the code (where it is defined)."""
    name = defined or str(target)
    module = name.rpartition(".")[0] or name
    detail = f" (it is {defined})" if defined else ""
    return SpearError(f"{key}={target} is not allowed{detail}: a config may name only spear's callbacks and strategies "
                      f"and Lightning's or Hydra's own classes; remove it, or, if you trust that code, allow its module "
                      f"outside the config: export {ENV_VAR}={module}")


def check_target(key: str, target: Any) -> None:
    """Refuse ``target`` (the value of config ``key``) unless the allow-list admits both its name and what it is."""
    entries = allowed_entries()
    if not isinstance(target, str):
        raise SpearError(f"{key}={target!r} is not the dotted name of a class or function; write one, "
                         "e.g. pytorch_lightning.callbacks.ModelCheckpoint")
    if not _under(target, entries, public=True):
        raise _refusal(key, target)
    from hydra._internal.utils import _locate  # what hydra.utils.instantiate resolves a name with

    try:
        obj = _locate(target)
    except Exception as err:  # ImportError, AttributeError, or whatever importing the module raised
        lines = [line for line in str(err).splitlines() if line.strip()] or [type(err).__name__]
        reason = lines[1] if len(lines) > 1 else lines[0]  # Hydra's message: "Error loading 'x':", the cause, a hint
        raise SpearError(f"{key}={target} cannot be imported ({reason}); fix its spelling or install its package") from None
    if not (inspect.isclass(obj) or inspect.isfunction(obj)) or "." in obj.__qualname__:  # no methods: their
        # first argument can be an object the config builds (TorchCheckpointIO().load_checkpoint unpickles)
        raise SpearError(f"{key}={target} is not a class or a module-level function; name a class")
    defined = f"{obj.__module__}.{obj.__qualname__}"
    if not _under(defined, entries, public=False):
        raise _refusal(key, target, defined)


def named_callables(node: Any, path: str = "") -> Iterator[tuple[str, Any]]:
    """(dotted key, value) of every ``_target_`` in a config tree, and of every ``()``/``class`` of a logging node."""
    if isinstance(node, dict):
        for key, value in node.items():
            child = f"{path}{key}"
            if key == TARGET_KEY or (key in LOGGING_KEYS and path.startswith(LOGGING_NODES)):
                yield child, value
            else:
                yield from named_callables(value, child + ".")
    elif isinstance(node, list):
        for index, value in enumerate(node):
            yield from named_callables(value, f"{path}{index}.")


def check_targets(data: dict[str, Any]) -> None:
    """Every callable a resolved config (a plain dict) names is allowed; a one-line SpearError otherwise."""
    for key, target in named_callables(data):
        check_target(key, target)


def check_config(cfg) -> None:
    """:func:`check_targets` on a composed ``DictConfig``, resolving only the names (the rest may need a run)."""
    from omegaconf import OmegaConf

    for key, target in named_callables(OmegaConf.to_container(cfg, resolve=False)):
        if isinstance(target, str) and "${" in target:
            try:
                target = OmegaConf.select(cfg, key, throw_on_missing=True)
            except Exception:  # an interpolation that resolves only inside a run: refused as written
                pass
        check_target(key, target)


def check_command_line(stage: str, argv: list[str], task_function: Callable):
    """Every callable that running ``argv`` would make Hydra or the stage call, checked before Hydra creates a
    dir or instantiates anything: the config of a run, or the sweep's and each job's of a basic multirun.
    Returns the run's (or the sweep's) composed config, ``None`` when nothing would run.

    Another sweeper's jobs are known only as they run; :func:`spear.config.validate` checks each job then.
    """
    first = None
    for cfg in planned_configs(stage, argv, task_function):
        check_config(cfg)
        first = cfg if first is None else first
    return first


def planned_configs(stage: str, argv: list[str], task_function: Callable) -> Iterator:
    """What ``hydra.main`` composes for ``argv`` (``--config-dir``, ``--config-name``, ``-m`` and Hydra's
    ``hydra.*`` nodes included), one config at a time; nothing when it would not run (``--cfg``, ``--help``)
    and nothing more once a composition fails (Hydra stops with that error before running it)."""
    from hydra._internal.hydra import Hydra
    from hydra._internal.utils import (
        create_automatic_config_search_path,
        detect_calling_file_or_module_from_task_function,
        detect_task_name,
        get_args_parser,
    )
    from hydra.core.config_search_path import SearchPathQuery
    from hydra.core.global_hydra import GlobalHydra
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    from spear.config.store import register

    register()  # the schema's group options, as hydra_entry registers them
    try:
        args = get_args_parser().parse_args(argv)
    except SystemExit:  # a malformed command line: Hydra says so itself
        return
    if args.help or args.hydra_help or args.cfg or args.info or args.shell_completion:
        return
    calling_file, calling_module = detect_calling_file_or_module_from_task_function(task_function)
    try:
        search_path = create_automatic_config_search_path(calling_file, calling_module, args.config_path or str(CONF_DIR))
        if args.config_dir is not None:
            search_path.prepend(provider="command-line", path=f"file://{os.path.abspath(args.config_dir)}",
                                anchor=SearchPathQuery(provider="schema"))
        hydra = Hydra.create_main_hydra2(task_name=detect_task_name(calling_file, calling_module),
                                         config_search_path=search_path)
    except HydraException:  # a bad --config-dir: Hydra reports it
        return
    try:
        yield from _composed(hydra, args.config_name or stage, list(args.overrides), args.multirun)
    except (HydraException, OmegaConfBaseException):  # Hydra stops with this error before running what failed
        return
    finally:
        GlobalHydra.instance().clear()


def _composed(hydra, config_name: str, overrides: list[str], multirun: bool) -> Iterator:
    """The run's config, or a multirun's master config and (basic sweeper) every job's, as Hydra composes them."""
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.types import RunMode
    from omegaconf import OmegaConf

    mode = hydra.get_mode(config_name=config_name, overrides=overrides)
    if mode is None or multirun:
        mode = RunMode.MULTIRUN if multirun else RunMode.RUN
    cfg = hydra.compose_config(config_name=config_name, overrides=overrides, run_mode=mode)
    yield cfg
    sweeper = cfg.hydra.sweeper
    if mode == RunMode.RUN or sweeper.get(TARGET_KEY) != f"{BasicSweeper.__module__}.{BasicSweeper.__name__}":
        return
    params = [f"{k}={v}" for k, v in (sweeper.get("params") or {}).items()]
    parsed = OverridesParser.create(config_loader=hydra.config_loader).parse_overrides(
        params + OmegaConf.to_container(cfg.hydra.overrides.task, resolve=False))
    for job in BasicSweeper.split_arguments(parsed, None)[0]:
        yield hydra.config_loader.load_sweep_config(cfg, list(job))
