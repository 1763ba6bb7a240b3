"""Run summaries: model rows, seed intervals, Pareto relations, Markdown and the Pareto plot.

The one reporting module: the pipeline builds and writes ``summary.json``/``summary.md`` with it and
``spear.tracking.collate`` renders recorded experiments with the same tables, so a number reads the
same wherever it is shown. Pure functions over plain dicts (IO only in :func:`write_summary` and
:func:`pareto_plot`). A model entry is ``{"name": str, "kind": str, "metrics": {key: float | None},
...}``; several seeds of the same model are aggregated into mean and a 95% t-interval per metric.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from spear.errors import SpearError
from spear.evaluation.retention import task_stderr

PARETO_AXES = ("general_retention", "domain_gain_preservation")
# the headline columns, in this order; every other metric is a raw column
PRIMARY_COLUMNS = ("general_retention", "domain_gain_preservation", "mean_t")
FRONTIER_AXES = ("general", "domain")
FRONTIER_COLUMNS = tuple(f"frontier/{axis}" for axis in FRONTIER_AXES)


# ----------------------------------------------------------------------------- rows


def model_entry(name: str, kind: str, results: dict[str, Any], retention: dict[str, Any] | None,
                seed: int, **extra: Any) -> dict[str, Any]:
    """One row of ``summary.json`` from a model's ``results.json`` and ``retention.json``.

    ``metrics`` holds ``<task>/<primary metric>`` (with ``<task>/<metric>_stderr``: lm-eval's, else
    binomial from ``n_samples`` for accuracies, so single-seed tables still show their noise),
    ``ppl/<corpus>``, ``nll/<corpus>`` (with ``nll/<corpus>_stderr`` for chat records: the standard error over
    records), ``mean_t`` (from ``extra``) and, given ``retention``,
    ``general_retention`` and ``domain_gain_preservation``. ``extra`` is stored on the row too.
    """
    metrics: dict[str, Any] = {}
    for task, values in results.get("tasks", {}).items():
        metric = results.get("primary_metric", {}).get(task)
        if metric is None or values.get(metric) is None:
            continue
        metrics[f"{task}/{metric}"] = values[metric]
        se = task_stderr(results, task, metric)
        if se is not None:
            metrics[f"{task}/{metric}_stderr"] = se
    for corpus, ppl in results.get("perplexity", {}).items():
        metrics[f"ppl/{corpus}"] = ppl
        metrics[f"nll/{corpus}"] = results.get("nll", {}).get(corpus)
        se = results.get("nll_stderr", {}).get(corpus)
        if se is not None:
            metrics[f"nll/{corpus}_stderr"] = se
    metrics["mean_t"] = extra.get("mean_t")
    if retention is not None:
        metrics["general_retention"] = retention.get("general_retention")
        metrics["domain_gain_preservation"] = retention.get("domain_gain_preservation")
        if retention.get("left_out"):
            extra = {**extra, "left_out": retention["left_out"]}
    return {"name": name, "kind": kind, "seed": seed, "metrics": metrics, **extra}


# ------------------------------------------------------------------------- statistics


def mean_ci95(values: Sequence[float | None]) -> dict[str, Any]:
    """Mean and 95% t-interval of the non-missing values (interval null for a single value)."""
    from scipy.stats import t as student_t  # here: importing the module stays cheap for collate's CLI

    xs = [float(v) for v in values if v is not None and math.isfinite(v)]
    if not xs:
        return {"mean": None, "ci95": None, "n": 0}
    mean = sum(xs) / len(xs)
    if len(xs) < 2:
        return {"mean": mean, "ci95": None, "n": 1}
    sd = math.sqrt(sum((x - mean) ** 2 for x in xs) / (len(xs) - 1))
    half = float(student_t.ppf(0.975, len(xs) - 1)) * sd / math.sqrt(len(xs))
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
        seeds = [r.get("seed") for r in runs]
        known = [s for s in seeds if s is not None]
        if len(set(known)) < len(known):
            raise SpearError(f"two results named {name!r} come from the same seed {seeds}: they are different models and "
                             "an interval spans seeds only; give each model its own name (a policy's `label`)")
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
        if FRONTIER_COLUMNS[0] in entry["metrics"]:
            entry["frontier_advantage"] = {axis: {"mean": entry["metrics"].get(f"frontier/{axis}"),
                                                  "ci95": entry["ci95"].get(f"frontier/{axis}")} for axis in FRONTIER_AXES}
        out.append(entry)
    return out


# -------------------------------------------------------------------------- relations


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


def relations_of(entries: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """For every policy (``kind == "policy"``): its relation to each of its controls (entries whose
    ``control_of`` names it), then to the adapted model: the comparisons a selective method must win."""
    adapted = next((e for e in entries if e["name"] == "adapted"), None)
    out = []
    for e in entries:
        if e.get("kind") != "policy":
            continue
        for other in [c for c in entries if c.get("control_of") == e["name"]] + [adapted]:
            if other is not None:
                out.append({"policy": e["name"], "versus": other["name"], "relation": relation(e, other)})
    return out


# --------------------------------------------------------------------------- Markdown


def number(value: float | None, digits: int = 3) -> str:
    """A number with ``digits`` decimals, "—" when missing (JSON null)."""
    return "—" if value is None else f"{value:.{digits}f}"


def _cell(value: Any, ci: list[float] | None = None, se: float | None = None, digits: int = 3) -> str:
    if value is None:
        return "—"
    if not isinstance(value, float):
        return str(value)
    text = number(value, digits)
    if ci:
        return f"{text} ± {(ci[1] - ci[0]) / 2:.{digits}f}"
    return f"{text} (se {se:.{digits}f})" if se is not None else text


def raw_columns(entries: Sequence[dict[str, Any]]) -> list[str]:
    """Every metric key of ``entries`` beyond :data:`PRIMARY_COLUMNS`, sorted; stderrs go into their
    metric's cell, not a column of their own."""
    keys = {k for e in entries for k in e["metrics"]} - set(PRIMARY_COLUMNS) - set(FRONTIER_COLUMNS)
    return sorted(k for k in keys if not k.endswith("_stderr"))


def markdown_table(entries: Sequence[dict[str, Any]], columns: Sequence[str]) -> str:
    """A Markdown table of ``columns`` (metric keys) per model: ± half-widths of 95% CIs over seeds,
    else the metric's own standard error (``<column>_stderr``, e.g. an accuracy's binomial SE)."""
    lines = ["| model | " + " | ".join(columns) + " |", "|---|" + "---|" * len(columns)]
    for e in entries:
        m = e["metrics"]
        cells = [_cell(m.get(c), e.get("ci95", {}).get(c), m.get(f"{c}_stderr")) for c in columns]
        lines.append(f"| {e['name']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def relations_table(relations: Sequence[dict[str, Any]]) -> str:
    """The Markdown table of :func:`relations_of` rows."""
    rows = [f"| {r['policy']} | {r['versus']} | {r['relation']} |" for r in relations]
    return "\n".join(["| policy | versus | relation |", "|---|---|---|", *rows])


def frontier_columns(entries: Sequence[dict[str, Any]]) -> list[str]:
    return [c for c in FRONTIER_COLUMNS if any(c in e["metrics"] for e in entries)]


def _verdict(adv: dict[str, Any]) -> str:
    ci = adv["ci95"]
    if ci is None:
        return "one seed: no interval"
    if ci[0] > 0:
        return "beats the front: the 95% interval is above 0"
    return "below the front: the 95% interval is below 0" if ci[1] < 0 else "within noise: the 95% interval spans 0"


def _signed(adv: dict[str, Any]) -> str:
    ci = adv["ci95"]
    return f"{adv['mean']:+.4f}" + (f" ± {(ci[1] - ci[0]) / 2:.4f}" if ci else "")


def frontier_section(summary: dict[str, Any]) -> list[str]:
    """Markdown lines: each policy's, control's and frozen CPT's advantage over the uniform front."""
    front = summary.get("frontier") or {}
    rows = [e for e in summary["models"] if e.get("frontier_advantage") and e["kind"] in ("policy", "control", "freeze")]
    if not front.get("per_seed") or not rows:
        return []
    lines = [
        "## Against the uniform frontier",
        "",
        f"The uniform whole-model sweep t = {front['ts']} per seed, its Pareto front in (domain NLL on "
        f"`{front['domain']}`, general NLL on `{front['general']}`), extended flat beyond its ends. Frontier advantage: "
        "the front's NLL at the model's other coordinate minus the model's, in nats per token (> 0: better than "
        "uniform interpolation at matched ability).",
        "",
    ]
    for e in rows:
        g, d = e["frontier_advantage"]["general"], e["frontier_advantage"]["domain"]
        scores = [f"{k.removeprefix('frontier/')} {_signed(_with_ci(e, k))}" for k in sorted(e["metrics"])
                  if k.startswith("frontier/") and k not in FRONTIER_COLUMNS]
        tail = f" Scores against their front: {', '.join(scores)}." if scores else ""
        lines.append(f"- `{e['name']}`: general {_signed(g)} ({_verdict(g)}); domain {_signed(d)} ({_verdict(d)}).{tail}")
    return [*lines, ""]


def _with_ci(entry: dict[str, Any], key: str) -> dict[str, Any]:
    return {"mean": entry["metrics"].get(key), "ci95": entry.get("ci95", {}).get(key)}


def noisy_note(entries: Sequence[dict[str, Any]]) -> list[str]:
    """The sentence naming the tasks left out of the aggregates as too noisy (none: no sentence)."""
    left: dict[str, float] = {}
    for e in entries:
        for name, rel in (e.get("left_out") or {}).items():
            left[name] = max(left.get(name, 0.0), rel or 0.0)
    if not left:
        return []
    named = ", ".join(f"{name} (standard error {100 * rel:.1f}% of the base score)" for name, rel in sorted(left.items()))
    return [f"Left out of general_retention and domain_gain_preservation as too noisy (eval.max_relative_stderr): "
            f"{named}; its own column is in the raw table."]


def summary_markdown(summary: dict[str, Any]) -> str:
    """``summary.md`` of a pipeline run: every model's metrics, the policy-vs-control relations and the
    cost per stage (``summary`` as in ``summary.json``: ``seeds``, ``models``, ``relations``, ``cost``)."""
    entries = summary["models"]
    seeds = summary["seeds"]
    cost = summary["cost"]
    lines = [
        "# SPEAR-MM pipeline summary",
        "",
        f"Seeds: {seeds} ({len(seeds)} CPT run(s)); values are means"
        + (" ± half-width of the 95% t-interval over seeds." if len(seeds) > 1 else "."),
        "general_retention: mean over general entries of score(model)/score(base) (NLL: nll(base)/nll(model)); "
        "domain_gain_preservation: (dom(model)-dom(base))/(dom(adapted)-dom(base)).",
        *noisy_note(entries),
        "",
        markdown_table(entries, [*PRIMARY_COLUMNS, *frontier_columns(entries), *raw_columns(entries)]),
        "",
        *frontier_section(summary),
        "## Policy vs controls (Pareto on general retention, domain-gain preservation)",
        "",
        relations_table(summary["relations"]),
        "",
        "## Cost",
        "",
        "| stage | seconds | device-hours | reused |",
        "|---|---|---|---|",
        *[f"| {c['stage']} | {c['seconds']:.1f} | {c['device_hours']:.4f} | {c['reused']} |" for c in cost["stages"]],
        "",
        f"One extra policy configuration (in-memory merge + evaluation) costs {cost['extra_policy_vs_cpt']:.3f}× "
        "one CPT run." if cost.get("extra_policy_vs_cpt") else "",
    ]
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------------------- files


def _front_box(points: Sequence[tuple[float, float]]) -> tuple[float, float, float, float]:
    """(x0, x1, y0, y1) around the sweep's Pareto-optimal points (lower is better on both axes), padded by
    the front's own extent or a tenth of the whole sweep's, whichever is larger: the region where a method
    that competes with the front lands."""
    front = [p for p in points if not any(q[0] <= p[0] and q[1] <= p[1] and q != p for q in points)]
    xs, ys = [p[0] for p in front], [p[1] for p in front]
    whole = max(max(p[0] for p in points) - min(p[0] for p in points), max(p[1] for p in points) - min(p[1] for p in points))
    pad = max(max(xs) - min(xs), max(ys) - min(ys), whole / 10)
    return min(xs) - pad, max(xs) + pad, min(ys) - pad, max(ys) + pad


def pareto_plot(entries: Sequence[dict[str, Any]], path: Path, title: str = "SPEAR-MM trade-off",
                frontier: dict[str, Any] | None = None) -> Path:
    """One labelled point per model (with its seed interval). With ``frontier`` (summary.json's): the
    low-noise axes, domain NLL vs general NLL, the uniform sweep's mean front as a line, and a second
    panel zoomed on the front's best points, where the methods that compete with it crowd; without:
    general retention vs domain-gain preservation."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sweep_mean: list[tuple[float, float]] = []
    if frontier and frontier.get("per_seed"):
        axes = (f"nll/{frontier['domain']}", f"nll/{frontier['general']}")
        labels = (f"domain NLL ({frontier['domain']}, nats/token; lower is better)",
                  f"general NLL ({frontier['general']}, nats/token; lower is better)")
        sweeps = list(frontier["per_seed"].values())
        sweep_mean = [(sum(s[i]["domain_nll"] for s in sweeps) / len(sweeps),
                       sum(s[i]["general_nll"] for s in sweeps) / len(sweeps)) for i in range(len(sweeps[0]))]
    else:
        axes = PARETO_AXES
        labels = ("general retention (1 = base)", "domain-gain preservation (1 = adapted)")
    zoom = _front_box(sweep_mean) if len(sweep_mean) > 2 else None
    fig, panels = plt.subplots(1, 2 if zoom else 1, figsize=(13 if zoom else 6.5, 5), squeeze=False)
    for ax, box in zip(panels[0], [None, zoom] if zoom else [None], strict=True):
        if sweep_mean:
            ax.plot([p[0] for p in sweep_mean], [p[1] for p in sweep_mean], "-", color="grey", alpha=0.7,
                    label="uniform sweep (mean)")
            ax.legend(fontsize=8)
        for i, e in enumerate(entries):  # a model keeps its colour in both panels
            x, y = e["metrics"].get(axes[0]), e["metrics"].get(axes[1])
            if x is None or y is None or (box and not (box[0] <= x <= box[1] and box[2] <= y <= box[3])):
                continue
            ci = e.get("ci95", {})
            xerr = [[x - ci[axes[0]][0]], [ci[axes[0]][1] - x]] if axes[0] in ci else None
            yerr = [[y - ci[axes[1]][0]], [ci[axes[1]][1] - y]] if axes[1] in ci else None
            baseline = e["name"] in ("base", "adapted")
            sweep = e.get("kind") == "frontier"
            ax.errorbar(x, y, xerr=xerr, yerr=yerr, fmt="s" if baseline else ("." if sweep else "o"), capsize=3,
                        color="black" if baseline else ("grey" if sweep else f"C{i % 10}"))
            ax.annotate(e["name"], (x, y), textcoords="offset points", xytext=(5, 4), fontsize=7 if sweep else 8)
        if box:
            ax.set_xlim(box[0], box[1])
            ax.set_ylim(box[2], box[3])
        ax.set_xlabel(labels[0])
        ax.set_ylabel(labels[1])
        ax.set_title(f"{title}: near the front's best points" if box else title)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def write_summary(out_dir: Path, summary: dict[str, Any]) -> str:
    """Write ``summary.json``, ``summary.md`` and ``pareto.png`` into ``out_dir``; returns the Markdown."""
    from spear.io.atomic import write_json_atomic, write_text_atomic

    out_dir = Path(out_dir)
    text = summary_markdown(summary)
    write_json_atomic(out_dir / "summary.json", summary)
    write_text_atomic(out_dir / "summary.md", text)
    pareto_plot(summary["models"], out_dir / "pareto.png", frontier=summary.get("frontier"))
    return text
