"""The uniform frontier (SPEC §1.7): the yardstick a selective restoration must beat.

A uniform-``t`` sweep gives points ``(d, g)``: domain NLL and general NLL, lower is better on both.
Its Pareto-optimal points, joined by straight lines and extended flat beyond the end points (the
attainment surface), are the *front*. A model at ``(d, g)`` has the **frontier advantage**

* ``general = g_front(d) - g``: > 0 when it has better general ability than the front at its domain NLL;
* ``domain = d_front(g) - d``: > 0 when it has better domain ability than the front at its general NLL.

A point on the front has advantage 0 on both axes, a dominated point a negative one, and a point that
dominates every sweep point a positive one. The same is read for every evaluated lm-eval score: a
general task's score against the sweep's front in (domain NLL, score), a domain task's in (general
NLL, score), so ``frontier/<task>/<metric>`` is the model's score minus the front's at its matched NLL
(> 0: better). Pure functions over floats.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

Point = tuple[float, float]  # (domain NLL, general NLL)


def pareto_front(points: Iterable[Point]) -> list[Point]:
    """The non-dominated points (lower is better on both axes), by increasing domain NLL."""
    front: list[Point] = []
    for d, g in sorted(set(points)):  # by d, then g: a later point is kept only if it improves g
        if not front or g < front[-1][1]:
            front.append((d, g))
    return front


def _interpolate(xs: Sequence[float], ys: Sequence[float], x: float) -> float:
    """Piecewise-linear ``y(x)`` through increasing ``xs``, flat beyond the end points."""
    if x <= xs[0]:
        return ys[0]
    if x >= xs[-1]:
        return ys[-1]
    for (x0, y0), (x1, y1) in zip(zip(xs, ys, strict=True), zip(xs[1:], ys[1:], strict=True), strict=True):
        if x0 <= x <= x1:
            return y0 + (y1 - y0) * (x - x0) / (x1 - x0)
    raise AssertionError("unreachable: xs must be increasing")


def front_general(front: Sequence[Point], d: float) -> float:
    """The front's general NLL at domain NLL ``d``."""
    return _interpolate([p[0] for p in front], [p[1] for p in front], d)


def front_domain(front: Sequence[Point], g: float) -> float:
    """The front's domain NLL at general NLL ``g`` (the front read along the other axis)."""
    by_g = sorted(front, key=lambda p: p[1])
    return _interpolate([p[1] for p in by_g], [p[0] for p in by_g], g)


def frontier_advantage(front: Sequence[Point], d: float, g: float) -> dict[str, float]:
    """``{"general": g_front(d) - g, "domain": d_front(g) - d}`` in nats per token (> 0: beats the front)."""
    if not front:
        raise ValueError("the uniform front has no points")
    return {"general": front_general(front, d) - g, "domain": front_domain(front, g) - d}


def sweep_points(results_by_t: dict[float, dict], general: str, domain: str) -> list[dict[str, float]]:
    """The uniform sweep of one CPT seed as ``[{"t", "domain_nll", "general_nll"}]`` (results.json per ``t``)."""
    return [{"t": t, "domain_nll": r["nll"][domain], "general_nll": r["nll"][general]}
            for t, r in sorted(results_by_t.items())]


def add_frontier_advantage(entries: list[dict], points: list[dict[str, float]], general: str, domain: str) -> None:
    """Give each model row of one seed ``metrics["frontier/general"]`` and ``["frontier/domain"]``."""
    front = pareto_front((p["domain_nll"], p["general_nll"]) for p in points)
    for entry in entries:
        d, g = entry["metrics"].get(f"nll/{domain}"), entry["metrics"].get(f"nll/{general}")
        if d is None or g is None:
            continue
        adv = frontier_advantage(front, d, g)
        entry["metrics"]["frontier/general"] = adv["general"]
        entry["metrics"]["frontier/domain"] = adv["domain"]


def add_score_advantage(entries: list[dict], results_by_t: dict[float, dict], tasks_by_role: dict[str, Sequence[str]],
                        general: str, domain: str) -> None:
    """Give each model row ``metrics["frontier/<task>/<metric>"]`` for every primary lm-eval score of a general
    task (matched at the row's domain NLL) or a domain task (matched at its general NLL)."""
    matched_on = {"general": domain, "domain": general}
    for role, tasks in tasks_by_role.items():
        other = matched_on[role]
        keys = sorted({k for e in entries for k in e["metrics"]
                       if k.split("/", 1)[0] in tasks and not k.endswith("_stderr") and not k.startswith("frontier/")})
        for key in keys:
            task, metric = key.split("/", 1)
            points = [(r["nll"][other], -r["tasks"][task][metric]) for r in results_by_t.values()
                      if r.get("tasks", {}).get(task, {}).get(metric) is not None]
            if not points:
                continue
            front = pareto_front(points)
            for entry in entries:
                x, score = entry["metrics"].get(f"nll/{other}"), entry["metrics"].get(key)
                if x is not None and score is not None:
                    entry["metrics"][f"frontier/{key}"] = score + front_general(front, x)
