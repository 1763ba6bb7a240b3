"""The uniform front and the frontier advantage on hand-made points (SPEC §1.7)."""

from __future__ import annotations

import pytest

from spear.tracking.frontier import frontier_advantage, pareto_front

# a uniform sweep from adapted (good domain, bad general) to base (bad domain, good general);
# (2.9, 3.1) is dominated by (2.8, 3.05) and is not on the front
SWEEP = [(2.4, 3.3), (2.5, 3.2), (2.9, 3.1), (2.8, 3.05), (3.0, 3.0)]


def test_front_keeps_the_non_dominated_points_in_domain_order():
    assert pareto_front(SWEEP) == [(2.4, 3.3), (2.5, 3.2), (2.8, 3.05), (3.0, 3.0)]
    assert pareto_front([(1.0, 1.0), (1.0, 2.0), (2.0, 1.0)]) == [(1.0, 1.0)]


@pytest.mark.parametrize("point", [(2.4, 3.3), (2.5, 3.2), (2.8, 3.05), (3.0, 3.0), (2.65, 3.125)])
def test_a_point_on_the_front_has_advantage_zero(point):
    adv = frontier_advantage(pareto_front(SWEEP), *point)
    assert adv["general"] == pytest.approx(0.0, abs=1e-12) and adv["domain"] == pytest.approx(0.0, abs=1e-12)


def test_dominated_and_dominating_points():
    front = pareto_front(SWEEP)
    worse = frontier_advantage(front, 2.65, 3.2)  # above the segment (2.5, 3.2)-(2.8, 3.05)
    assert worse["general"] == pytest.approx(3.125 - 3.2) and worse["domain"] < 0
    better = frontier_advantage(front, 2.6, 3.1)
    assert better["general"] == pytest.approx(3.15 - 3.1) and better["domain"] == pytest.approx(2.7 - 2.6)
    # dominating every sweep point: positive on both axes (the front is extended flat beyond its ends)
    best = frontier_advantage(front, 2.3, 2.9)
    assert best["general"] == pytest.approx(3.3 - 2.9) and best["domain"] == pytest.approx(3.0 - 2.3)
    # worse on the domain than every sweep point but better on general than all of them: still above 0
    assert frontier_advantage(front, 3.2, 2.95)["general"] == pytest.approx(0.05)


def test_an_empty_front_is_an_error():
    with pytest.raises(ValueError):
        frontier_advantage([], 1.0, 1.0)


def test_score_advantage_reads_each_task_against_its_own_front():
    """A general task's accuracy against the sweep's front at matched domain NLL; a domain task's at matched general NLL."""
    from spear.tracking.frontier import add_score_advantage

    def results(d, g, acc, fin):
        return {"nll": {"fin": d, "gen": g}, "tasks": {"arc": {"acc": acc}, "fpb": {"acc": fin}}}

    sweep = {0.0: results(1.0, 3.0, 0.40, 0.70), 0.5: results(1.5, 2.5, 0.50, 0.60), 1.0: results(2.0, 2.0, 0.60, 0.50)}

    def row(d, g, acc, fin):
        return {"metrics": {"nll/fin": d, "nll/gen": g, "arc/acc": acc, "arc/acc_stderr": 0.01, "fpb/acc": fin}}

    on, better, worse = row(1.25, 2.75, 0.45, 0.65), row(1.25, 2.75, 0.55, 0.70), row(1.5, 2.5, 0.45, 0.55)
    add_score_advantage([on, better, worse], sweep, {"general": ["arc"], "domain": ["fpb"]}, "gen", "fin")
    assert on["metrics"]["frontier/arc/acc"] == pytest.approx(0.0)
    assert on["metrics"]["frontier/fpb/acc"] == pytest.approx(0.0)
    assert better["metrics"]["frontier/arc/acc"] == pytest.approx(0.10)
    assert better["metrics"]["frontier/fpb/acc"] == pytest.approx(0.05)
    assert worse["metrics"]["frontier/arc/acc"] == pytest.approx(-0.05)
    assert "frontier/arc/acc_stderr" not in worse["metrics"]
