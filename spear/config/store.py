"""Registering the schema with Hydra, composing a stage's config, and validating it once.

:func:`register` puts every group option of :mod:`spear.config.schema` and every stage's options
(``<stage>_options``) into Hydra's ConfigStore as plain nodes: Hydra composes and overrides them
without checking types, so that :func:`validate` can check the composed config against the stage's
root model and report the first problem as one line naming the key (``error: policy.k=2.7: ...``).
:func:`compose` is the same composition for tests, notebooks and tools (no Hydra app needed).
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

from spear.config.schema import GROUP_OPTIONS, MISSING
from spear.config.stages import STAGE_OPTIONS, STAGE_RUNS
from spear.config.targets import check_targets
from spear.errors import SpearError

# How to set a required key, where "set KEY=<value>" is not enough of a hint.
REQUIRED_HINTS = {
    "adapted": "set adapted=<HF dir, .gguf file or alias> (the CPT model)",
    "data.paths": "give text/JSONL files, globs, dirs or asset:<name>, e.g. data.paths=[corpus.txt]",
}


@functools.cache
def register() -> None:
    """Store the schema's group options and stage options in Hydra's ConfigStore (once per process)."""
    from hydra.core.config_store import ConfigStore

    store = ConfigStore.instance()
    for group, options in GROUP_OPTIONS.items():
        for name, node in options.items():
            store.store(group=group, name=name, node=node.model_dump(mode="json", warnings=False))
    for stage, options in STAGE_OPTIONS.items():
        store.store(name=f"{stage}_options", node=options().model_dump(mode="json", warnings=False))


def compose_raw(stage: str, overrides: list[str] | None = None):
    """The composed, unvalidated ``DictConfig`` of ``stage`` (inside or outside a Hydra app)."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from spear.paths import CONF_DIR

    register()
    if GlobalHydra.instance().is_initialized():
        return compose(config_name=stage, overrides=list(overrides or []))
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose(config_name=stage, overrides=list(overrides or []))


def check_overrides(stage: str, overrides: list[str]) -> None:
    """Compose ``stage`` with command-line ``overrides``; Hydra's composition errors become one line."""
    import re

    from hydra.errors import HydraException

    try:
        compose_raw(stage, overrides)
    except HydraException as err:
        lines = [line.strip() for line in str(err).splitlines() if line.strip()]
        unknown = re.match(r"Could not override '([^']+)'", lines[0])
        missing = re.search(r"Could not find '([^']+)/([^']+)'", lines[0])
        if unknown:
            message = (f"{unknown[1]} is not a key of spear.{stage}; fix its spelling "
                       "(docs/CONFIG.md lists every key and option)")
        elif missing:
            options = lines[lines.index(f"Available options in '{missing[1]}':") + 1:] if (
                f"Available options in '{missing[1]}':" in lines) else []
            options = [o for o in options if not o.startswith(("Config search path", "provider="))]
            message = f"{missing[1]}={missing[2]} is not an option; choose one of {', '.join(options) or '(none)'}"
        else:
            message = f"the overrides do not parse: {lines[0]}; see Hydra's override grammar"
        raise SpearError(message) from None


def compose(stage: str, overrides: list[str] | None = None):
    """``stage``'s validated run config (:mod:`spear.config.stages`) for command-line ``overrides``."""
    return validate(compose_raw(stage, overrides), stage)


def validate(cfg, stage: str):
    """The typed run config of ``stage`` from a composed ``DictConfig``; a one-line SpearError if invalid."""
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException
    from pydantic import ValidationError

    try:
        data = OmegaConf.to_container(cfg, resolve=True, throw_on_missing=False)
    except OmegaConfBaseException as err:
        raise SpearError(f"the config does not resolve: {str(err).splitlines()[0]}; fix the interpolation it names") from None
    check_targets(data)  # no code from a config (spear.config.targets), whichever way it was composed
    data.pop("hydra", None)
    missing = _missing_keys(data)
    if missing:
        key = missing[0]
        raise SpearError(f"{key} is required; {REQUIRED_HINTS.get(key, f'set {key}=<value>')}")
    try:
        return STAGE_RUNS[stage].model_validate(data)
    except ValidationError as err:
        raise SpearError(describe(err.errors()[0], data, stage)) from None


def _missing_keys(node: Any, prefix: str = "") -> list[str]:
    if isinstance(node, dict):
        return [k for key, value in node.items() for k in _missing_keys(value, f"{prefix}{key}.")]
    if isinstance(node, list):
        return [k for i, value in enumerate(node) for k in _missing_keys(value, f"{prefix}{i}.")]
    return [prefix.rstrip(".")] if node == MISSING else []


def _key_and_value(loc: tuple[Any, ...], data: Any) -> tuple[str, Any]:
    """The dotted config key of a pydantic error location, skipping union tags and type names."""
    parts: list[str] = []
    node = data
    for i, part in enumerate(loc):
        if isinstance(node, dict) and part in node:
            parts.append(str(part))
            node = node[part]
        elif isinstance(node, list) and isinstance(part, int) and part < len(node):
            parts.append(str(part))
            node = node[part]
        elif isinstance(node, dict) and i == len(loc) - 1:
            parts.append(str(part))  # a key that is absent
            node = None
    return ".".join(parts), node


def describe(error: dict[str, Any], data: dict[str, Any], stage: str) -> str:
    """One line for a pydantic error: the key, its value, what is wrong and how to fix it."""
    key, value = _key_and_value(tuple(error["loc"]), data)
    kind, msg = error["type"], str(error["msg"])
    if kind == "extra_forbidden":
        return f"{key} is not a key of spear.{stage}'s config; check its spelling (docs/CONFIG.md lists every key)"
    if kind == "missing":
        return f"{key} is required; {REQUIRED_HINTS.get(key, f'set {key}=<value>')}"
    if kind == "value_error":
        return msg.removeprefix("Value error, ")
    if kind == "union_tag_invalid":
        return f"{key}.name={value.get('name')!r} is unknown: {msg[0].lower()}{msg[1:]}" if isinstance(value, dict) else f"{key}: {msg}"
    return f"{key}={value!r}: {msg[0].lower()}{msg[1:]}; fix {key}"


def resolved_yaml(cfg) -> str:
    """The validated run config as YAML (what ``config.yaml`` records next to a run's outputs)."""
    import yaml

    data = cfg.model_dump(mode="json")
    return yaml.safe_dump({"task_name": data.pop("task_name"), **data}, sort_keys=False)


RUN_CONFIG = "config.yaml"


def save_run_config(cfg, out_dir: Path) -> str:
    """Write ``config.yaml`` among a stage's outputs, before its completion marker; returns the YAML.

    Hydra's ``.hydra/`` records the latest invocation in a run dir; this file records the config
    that produced the outputs beside it.
    """
    from spear.io.atomic import write_text_atomic

    text = resolved_yaml(cfg)
    write_text_atomic(Path(out_dir) / RUN_CONFIG, text)
    return text


def validate_node(schema: Any, data: dict[str, Any], key: str):
    """One group's config (``key``: its name on the command line) checked as a whole run's would be."""
    from pydantic import TypeAdapter, ValidationError

    try:
        return TypeAdapter(schema).validate_python(data)
    except ValidationError as err:
        first = err.errors()[0]
        raise SpearError(describe({**first, "loc": (key, *first["loc"])}, {key: data}, key)) from None
