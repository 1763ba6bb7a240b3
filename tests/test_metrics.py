"""The metric registry and the layer scoring helpers (no model files)."""

from __future__ import annotations

import pytest
import torch

from spear.analysis import metrics, scoring
from spear.analysis.metrics import METRICS, MatrixRow, MatrixTable, SpectraPair
from spear.config.schema import MetricsConfig
from spear.errors import SpearError


def test_registry_names_versions_and_columns():
    assert {"rel_change", "snr", "snr_gd", "swci", "sv_shift", "svdr", "svdr_whole", "svdr_erank", "random", "position"} <= set(METRICS)
    assert all(m.version for m in METRICS.values())
    cols = metrics.columns()
    assert cols[:4] == ["snr_base", "snr_adapted", "snr_gd_base", "snr_gd_adapted"]
    for change in ("rel_change", "svdr", "sv_shift", "swci"):
        assert change in cols
    assert metrics.versions()["snr"] == METRICS["snr"].version


def test_percentile_ranks_ties_and_single():
    assert metrics.percentile_ranks([5.0]) == [0.5]
    assert metrics.percentile_ranks([3.0, 1.0, 2.0]) == [1.0, 0.0, 0.5]
    assert metrics.percentile_ranks([0.0, 0.0, 0.0, 0.0]) == [0.5] * 4
    assert metrics.percentile_ranks([1.0, 2.0, 2.0, 3.0]) == [0.0, 0.5, 0.5, 1.0]


def _table(values_by_layer: list[dict[str, float]], modules=("self_attn.q_proj", "mlp.up_proj")) -> MatrixTable:
    rows = []
    for layer, vals in enumerate(values_by_layer):
        for m in modules:
            group = "attn" if m.startswith("self_attn") else "mlp"
            base = {c: 0.0 for c in metrics.columns() if METRICS[metrics.metric_of_column(c)].kind != "table"}
            base.update(vals)
            rows.append(MatrixRow(f"model.layers.{layer}.{m}.weight", layer, m, group, (4, 4), dict(base)))
    table = MatrixTable(rows, len(values_by_layer), metrics.columns(), {"seed": 3, **MetricsConfig().model_dump()})
    metrics.add_table_metrics(table)
    return table


def test_swci_importance_options():
    table = _table([{"rel_change": 0.1, "snr_gd_base": 2.0, "snr_base": 9.0}, {"rel_change": 0.3, "snr_gd_base": 1.0, "snr_base": 1.0}])
    assert [r.values["swci"] for r in table.rows] == pytest.approx([0.2, 0.2, 0.3, 0.3])
    table.params["swci_importance"] = "snr_percentile"
    assert metrics._swci(table, table.params) == pytest.approx([0.1, 0.1, 0.0, 0.0])
    table.params["swci_importance"] = "bogus"
    with pytest.raises(SpearError, match="swci_importance"):
        metrics._swci(table, table.params)


def test_random_is_seeded_and_position_marks_edges():
    a = _table([{}] * 5)
    b = _table([{}] * 5)
    assert a.column("random") == b.column("random")
    a.params["seed"] = 4
    assert metrics._random(a, a.params) != b.column("random")
    pos = [r.values["position"] for r in b.rows if r.module == "mlp.up_proj"]
    assert pos == [1.0, 0.5, 0.0, 0.5, 1.0]
    b.params["position_mode"] = "last"
    assert metrics._position(b, b.params)[-1] == 1.0


def test_pair_metrics_from_spectra():
    s = torch.tensor([[4.0, 2.0, 1.0, 0.5]])
    pair = SpectraPair(s, s * 0.5, 1.0, torch.tensor([2.0], dtype=torch.float64), torch.tensor([1.0], dtype=torch.float64))
    out = metrics.pair_metrics(pair, {"seed": 0, **MetricsConfig().model_dump()})
    assert out["rel_change"] == [0.5]
    assert out["sv_shift"] == pytest.approx([0.5])
    assert out["svdr_whole"] == pytest.approx([0.5])
    assert set(out) == {c for c in metrics.columns() if METRICS[metrics.metric_of_column(c)].kind != "table"}


def test_scoring_combines_components_and_breaks_ties():
    table = _table([{"rel_change": 0.1, "svdr_whole": 0.3}, {"rel_change": 0.5, "svdr_whole": 0.1}, {"rel_change": 0.3, "svdr_whole": 0.2}])
    scored = scoring.score_layers(table, {"rel_change": 1.0})
    assert scoring.order_layers(scored["score"]) == [1, 2, 0]
    scored = scoring.score_layers(table, {"svdr_whole": 1.0})
    assert scoring.order_layers(scored["score"]) == [0, 2, 1]
    assert scored["groups"]["attn"] == scored["score"]
    # all-equal scores: ties broken by layer index
    flat = _table([{}, {}, {}])
    assert scoring.order_layers(scoring.score_layers(flat, {"rel_change": 1.0})["score"]) == [0, 1, 2]
    with pytest.raises(SpearError, match="impact.components"):
        scoring.score_layers(table, {"nope": 1.0})


def test_spearman():
    assert scoring.spearman([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
    assert scoring.spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    assert scoring.spearman([1, 1, 1, 1], [1, 2, 3, 4]) is None
