"""``python -m spear.config.table``: write ``docs/CONFIG.md``, the table of every config key.

Generated from the schema (:mod:`spear.config.schema`, :mod:`spear.config.stages`: key, type,
default, help) and from the YAML groups of other libraries' arguments under ``conf/`` (``trainer``,
``logger``, ``callbacks``: key, default, the line's comment), so the table cannot drift from the
code; a test checks that the committed file is what this module writes.
"""

from __future__ import annotations

import json
import re
import sys
import types
import typing
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated, Any, Literal, Union, get_args, get_origin

from pydantic import BaseModel

from spear.config.schema import GROUP_OPTIONS, OPTION_HELP, Node
from spear.config.stages import STAGE_OPTIONS
from spear.paths import CONF_DIR, PROJECT_ROOT

YAML_GROUPS = ("trainer", "logger", "callbacks")
OUTPUT = PROJECT_ROOT / "docs" / "CONFIG.md"


def _type(ann: Any) -> str:
    origin, args = get_origin(ann), get_args(ann)
    if origin is Annotated:
        return _type(args[0])
    if origin is Literal:
        return " / ".join(json.dumps(a) for a in args)
    if origin in (Union, types.UnionType):
        return " or ".join(_type(a) for a in args)
    if origin is list:
        return f"list of {_type(args[0])}"
    if origin is tuple:
        return f"({', '.join(_type(a) for a in args)})"
    if origin is dict:
        return f"map {_type(args[0])} → {_type(args[1])}"
    if ann is type(None):
        return "null"
    if isinstance(ann, type) and issubclass(ann, BaseModel):
        return "node"
    return getattr(ann, "__name__", str(ann))


def _value(value: Any) -> str:
    if isinstance(value, BaseModel):
        value = value.model_dump(mode="json", warnings=False)
    return json.dumps(value, default=str).replace("|", "\\|")


def _rows(model: type[BaseModel] | BaseModel, prefix: str) -> Iterator[str]:
    """One table row per field (nested nodes: one row per leaf), defaults taken from ``model``."""
    instance = model if isinstance(model, BaseModel) else None
    cls = type(model) if instance is not None else model
    for name, field in cls.model_fields.items():
        default = getattr(instance, name) if instance is not None else field.default
        if isinstance(default, Node):
            yield from _rows(default, f"{prefix}{name}.")
            continue
        help_text = (field.description or "").replace("|", "\\|")
        yield f"| `{prefix}{name}` | {_type(field.annotation).replace('|', '/')} | {_value(default)} | {help_text} |"
        item = typing.get_args(field.annotation)
        if typing.get_origin(field.annotation) is list and item and isinstance(item[0], type) and issubclass(item[0], Node):
            yield from _rows(item[0], f"{prefix}{name}[].")  # the fields of each list entry


HEADER = "| key | type | default | what it does |\n|---|---|---|---|"


def _schema_groups() -> Iterator[str]:
    for group, options in GROUP_OPTIONS.items():
        names = ", ".join(f"`{group}={n}`" + (f": {OPTION_HELP[group][n]}" if n in OPTION_HELP.get(group, {}) else "")
                          for n in options)
        yield f"### `{group}`\n\nOptions: {names}.\n"
        classes = {type(opt) for opt in options.values()}
        if len(classes) == 1:  # one schema: its defaults, then what each option changes
            cls = classes.pop()
            yield HEADER
            yield from _rows(cls.model_construct(), f"{group}.")
            base = cls.model_construct().model_dump(mode="json", warnings=False)
            changes = []
            for name, opt in options.items():
                diff = {k: v for k, v in opt.model_dump(mode="json", warnings=False).items() if base.get(k) != v}
                if diff:
                    changes.append(f"| `{group}={name}` | {_value(diff)} |")
            if changes:
                yield "\n| option | differs from the defaults above |\n|---|---|"
                yield from changes
        else:  # one schema per option (policy, merge): each with its own keys
            for name, opt in options.items():
                yield f"\n`{group}={name}`:\n\n{HEADER}"
                yield from _rows(opt, f"{group}.")
        yield ""


def _comments(path: Path) -> dict[str, str]:
    """``dotted.key -> trailing comment`` of a YAML file (nesting by indentation)."""
    out: dict[str, str] = {}
    stack: list[tuple[int, str]] = []
    for line in path.read_text().splitlines():
        m = re.match(r"^(\s*)([\w.]+):(.*)$", line)
        if not m or line.lstrip().startswith("#"):
            continue
        indent, key, rest = len(m.group(1)), m.group(2), m.group(3)
        while stack and stack[-1][0] >= indent:
            stack.pop()
        dotted = ".".join([k for _, k in stack] + [key])
        value, _, comment = rest.partition(" #")
        out[dotted] = comment.strip()
        if not value.strip():
            stack.append((indent, key))
    return out


def _yaml_option(group: str, name: str) -> dict[str, Any]:
    """An option of a YAML group with the options its ``defaults`` list names merged in (recursively)."""
    from omegaconf import OmegaConf

    node = OmegaConf.load(CONF_DIR / group / f"{name}.yaml")
    parts = [OmegaConf.create(_yaml_option(group, d)) for d in node.pop("defaults", []) if isinstance(d, str) and d != "_self_"]
    return OmegaConf.to_container(OmegaConf.merge(*parts, node)) if parts else OmegaConf.to_container(node)


def _flat(node: dict[str, Any], prefix: str = "") -> Iterator[tuple[str, Any]]:
    for key, value in node.items():
        if isinstance(value, dict) and value:
            yield from _flat(value, f"{prefix}{key}.")
        else:
            yield f"{prefix}{key}", value


def yaml_keys() -> list[str]:
    """Every key the YAML groups (and the root configs) of ``conf/`` define, dotted from the root."""
    keys = []
    for group in YAML_GROUPS:
        for path in sorted((CONF_DIR / group).glob("*.yaml")):
            keys += [f"{group}.{k}" for k, _ in _flat(_yaml_option(group, path.stem))]
    for path in sorted(CONF_DIR.glob("*.yaml")):
        keys += [k for k, _ in _flat(_yaml_option_root(path)) if k != "defaults"]
    return sorted(set(keys))


def _yaml_option_root(path: Path) -> dict[str, Any]:
    from omegaconf import OmegaConf

    node = OmegaConf.to_container(OmegaConf.load(path))
    node.pop("defaults", None)
    return node


def _yaml_groups() -> Iterator[str]:
    for group in YAML_GROUPS:
        options = sorted(p.stem for p in (CONF_DIR / group).glob("*.yaml"))
        yield f"### `{group}` (conf/{group}/)\n\nOptions: {', '.join(f'`{group}={o}`' for o in options)}.\n"
        yield "| key | option: value | what it does |\n|---|---|---|"
        rows: dict[str, dict[str, Any]] = {}
        comments: dict[str, str] = {}
        for option in options:
            comments.update({k: v for k, v in _comments(CONF_DIR / group / f"{option}.yaml").items() if v})
            for key, value in _flat(_yaml_option(group, option)):
                rows.setdefault(key, {})[option] = value
        for key, values in rows.items():
            shown = "; ".join(f"{o}: {_value(v)}" for o, v in values.items())
            yield f"| `{group}.{key}` | {shown} | {comments.get(key, '').replace('|', '/')} |"
        yield ""


def config_table() -> str:
    """The Markdown of docs/CONFIG.md."""
    lines = [
        "# Configuration reference",
        "",
        "Generated by `python -m spear.config.table` from `spear/config/schema.py`, `spear/config/stages.py` and the",
        "YAML groups under `conf/`; do not edit by hand. Every key can be set on the command line of each entry point",
        "that composes its group (`python -m spear.merge policy=top_k policy.k=4`), the pipeline included, and is",
        "validated (type, range, choices) before anything runs: a bad value stops with one `error:` line naming it.",
        "",
        "## Stage options",
        "",
    ]
    for stage, options in STAGE_OPTIONS.items():
        lines += [f"### `python -m spear.{stage}`", "", HEADER, *_rows(options(), ""), ""]
    lines += ["## Groups (typed schema)", "", *_schema_groups()]
    lines += ["## Groups of other libraries' arguments (YAML)", "", *_yaml_groups()]
    return "\n".join(lines).rstrip() + "\n"


def main() -> None:
    OUTPUT.write_text(config_table())
    print(f"wrote {OUTPUT}", file=sys.stderr)


if __name__ == "__main__":
    main()
