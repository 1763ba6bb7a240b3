"""Markdown tables of ``results.json`` and ``retention.json`` (printed with rich, saved as .md)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any


def _fmt(value: Any, digits: int = 4) -> str:
    if value is None:
        return "–"
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def _table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def results_markdown(results: Mapping[str, Any]) -> str:
    """Tasks (every metric, ± stderr when computed) and perplexity corpora of one model."""
    parts = [f"## Evaluation of `{results.get('model')}` (suite `{results.get('suite')}`)"]
    tasks = results.get("tasks") or {}
    if tasks:
        rows = []
        for task, metrics in tasks.items():
            primary = (results.get("primary_metric") or {}).get(task)
            for metric, value in metrics.items():
                if metric.split(",", 1)[0].endswith("_stderr"):
                    continue
                base, _, filt = metric.partition(",")
                stderr = metrics.get(f"{base}_stderr" + (f",{filt}" if filt else ""))
                rows.append([
                    task,
                    metric + (" *" if metric == primary else ""),
                    _fmt(value),
                    _fmt(stderr) if stderr is not None else "",
                    _fmt((results.get("n_samples") or {}).get(task)),
                    _fmt((results.get("n_shot") or {}).get(task)),
                ])
        parts.append(_table(["task", "metric", "value", "± stderr", "n", "shots"], rows))
        parts.append("`*` primary metric (used for retention)")
    if results.get("nll"):
        rows = [
            [corpus, _fmt(results["perplexity"].get(corpus), 3), _fmt(nll), _fmt((results.get("tokens") or {}).get(corpus))]
            for corpus, nll in results["nll"].items()
        ]
        parts.append(_table(["corpus", "perplexity", "nll / token", "tokens"], rows))
    if not tasks and not results.get("nll"):
        parts.append("(nothing evaluated: the suite lists no tasks and no corpora)")
    return "\n\n".join(parts) + "\n"


def retention_markdown(ret: Mapping[str, Any]) -> str:
    """Base / adapted / model numbers, retention and domain-gain preservation per entry."""
    models = ret.get("models") or {}
    parts = [
        f"## Retention of `{models.get('model')}` vs base `{models.get('base')}`"
        + (f", adapted `{models.get('adapted')}`" if models.get("adapted") else "")
    ]
    rows = []
    for name, e in (ret.get("entries") or {}).items():
        rows.append([
            name, e["kind"], e["metric"] + (" ↓" if e["lower_is_better"] else ""),
            _fmt(e["base"]), _fmt(e["adapted"]), _fmt(e["model"]),
            _fmt(e["retention"], 3), _fmt(e["gain_preservation"], 3),
        ])
    parts.append(_table(["entry", "kind", "metric", "base", "adapted", "model", "retention", "G"], rows))
    parts.append(
        f"**general_retention** {_fmt(ret.get('general_retention'), 3)} · "
        f"**domain_gain_preservation** {_fmt(ret.get('domain_gain_preservation'), 3)}  \n"
        "↓ lower is better (retention = base/model, G uses the decrease); G = (model − base)/(adapted − base)"
    )
    return "\n\n".join(parts) + "\n"


def print_markdown(text: str) -> None:
    from rich.console import Console
    from rich.markdown import Markdown

    Console().print(Markdown(text))
