"""Run summaries across models and seeds: intervals, dominance, Markdown and the Pareto plot.

Pure functions over plain dicts so the pipeline, notebooks and tests share them. A model
entry is ``{"name": str, "metrics": {key: float | None}, ...}``; several seeds of the same
model are aggregated into mean and a 95% t-interval per metric.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

# two-sided 95% Student-t quantiles for n-1 degrees of freedom (n <= 30); normal beyond
_T95 = [12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145,
        2.131, 2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045]

PARETO_AXES = ("general_retention", "domain_gain_preservation")


def mean_ci95(values: Sequence[float | None]) -> dict[str, Any]:
    """Mean and 95% t-interval of the non-missing values (interval null for a single value)."""
    xs = [float(v) for v in values if v is not None and math.isfinite(v)]
    if not xs:
        return {"mean": None, "ci95": None, "n": 0}
    mean = sum(xs) / len(xs)
    if len(xs) < 2:
        return {"mean": mean, "ci95": None, "n": 1}
    sd = math.sqrt(sum((x - mean) ** 2 for x in xs) / (len(xs) - 1))
    q = _T95[len(xs) - 2] if len(xs) - 2 < len(_T95) else 1.96
    half = q * sd / math.sqrt(len(xs))
    return {"mean": mean, "ci95": [mean - half, mean + half], "n": len(xs)}


def aggregate_seeds(per_seed: Sequence[Sequence[dict[str, Any]]]) -> list[dict[str, Any]]:
    """Merge per-seed model entries (same names) into one entry per model with mean/ci95."""
    order: list[str] = []
    by_name: dict[str, list[dict[str, Any]]] = {}
    for entries in per_seed:
        for entry in entries:
            if entry["name"] not in by_name:
                order.append(entry["name"])
            by_name.setdefault(entry["name"], []).append(entry)
    out = []
    for name in order:
        runs = by_name[name]
        keys = sorted({k for r in runs for k in r["metrics"]})
        stats = {k: mean_ci95([r["metrics"].get(k) for r in runs]) for k in keys}
        entry = {k: v for k, v in runs[0].items() if k not in ("metrics", "seed")}
        entry.update(
            name=name,
            seeds=[r.get("seed") for r in runs],
            metrics={k: s["mean"] for k, s in stats.items()},
            ci95={k: s["ci95"] for k, s in stats.items() if s["ci95"] is not None},
        )
        for axis in PARETO_AXES:
            entry[axis] = entry["metrics"].get(axis)
        out.append(entry)
    return out


def relation(a: dict[str, Any], b: dict[str, Any], axes: Sequence[str] = PARETO_AXES) -> str:
    """Pareto relation of model ``a`` to ``b`` on higher-is-better axes (means).

    Returns "dominates", "dominated", "incomparable", "equal" or "unknown" (a value missing).
    When both models carry 95% intervals that overlap on every axis, "(within noise)" is added.
    """
    va = [a["metrics"].get(k) for k in axes]
    vb = [b["metrics"].get(k) for k in axes]
    if any(v is None for v in va + vb):
        return "unknown"
    ge = all(x >= y for x, y in zip(va, vb, strict=True))
    le = all(x <= y for x, y in zip(va, vb, strict=True))
    verdict = "equal" if ge and le else "dominates" if ge else "dominated" if le else "incomparable"
    ca, cb = a.get("ci95", {}), b.get("ci95", {})
    if verdict != "equal" and all(k in ca and k in cb for k in axes):
        if all(ca[k][0] <= cb[k][1] and cb[k][0] <= ca[k][1] for k in axes):
            verdict += " (within noise)"
    return verdict


def _fmt(value: Any, ci: list[float] | None = None, se: float | None = None, digits: int = 3) -> str:
    if value is None:
        return "—"
    if isinstance(value, float):
        text = f"{value:.{digits}f}"
        if ci:
            return f"{text} ± {(ci[1] - ci[0]) / 2:.{digits}f}"
        return f"{text} (se {se:.{digits}f})" if se is not None else text
    return str(value)


def markdown_table(entries: Sequence[dict[str, Any]], columns: Sequence[str]) -> str:
    """A Markdown table of ``columns`` (metric keys) per model: ± half-widths of 95% CIs over seeds,
    else the metric's own standard error (``<column>_stderr``, e.g. an accuracy's binomial SE)."""
    lines = ["| model | " + " | ".join(columns) + " |", "|---|" + "---|" * len(columns)]
    for e in entries:
        m = e["metrics"]
        cells = [_fmt(m.get(c), e.get("ci95", {}).get(c), m.get(f"{c}_stderr")) for c in columns]
        lines.append(f"| {e['name']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def pareto_plot(entries: Sequence[dict[str, Any]], path: Path, title: str = "SPEAR-MM trade-off") -> Path:
    """General retention vs domain-gain preservation, one labelled point per model."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 5))
    for e in entries:
        x, y = e["metrics"].get(PARETO_AXES[0]), e["metrics"].get(PARETO_AXES[1])
        if x is None or y is None:
            continue
        ci = e.get("ci95", {})
        xerr = [[x - ci[PARETO_AXES[0]][0]], [ci[PARETO_AXES[0]][1] - x]] if PARETO_AXES[0] in ci else None
        yerr = [[y - ci[PARETO_AXES[1]][0]], [ci[PARETO_AXES[1]][1] - y]] if PARETO_AXES[1] in ci else None
        baseline = e["name"] in ("base", "adapted")
        ax.errorbar(x, y, xerr=xerr, yerr=yerr, fmt="s" if baseline else "o", capsize=3,
                    color="black" if baseline else None)
        ax.annotate(e["name"], (x, y), textcoords="offset points", xytext=(5, 4), fontsize=8)
    ax.set_xlabel("general retention (1 = base)")
    ax.set_ylabel("domain-gain preservation (1 = adapted)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
