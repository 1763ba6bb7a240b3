"""Policies: expected t maps on a fixed ranking, TMap semantics, ranking parsing, target search."""

from __future__ import annotations

import json

import pytest

from spear.errors import SpearError
from spear.merging.policies import (
    TMap,
    build_tmap,
    load_ranking,
    normalised_scores,
    parse_ranking,
    search_scale,
)

# 8 layers; scores chosen so that the order is 5, 2, 7, 0, 3, 6, 1, 4
SCORES = {0: 0.55, 1: 0.2, 2: 0.8, 3: 0.5, 4: 0.1, 5: 1.0, 6: 0.3, 7: 0.6}
ORDER = [5, 2, 7, 0, 3, 6, 1, 4]
GROUPS = {layer: {"attn": s, "mlp": s / 2} for layer, s in SCORES.items()}


def ranking_doc(with_groups=True):
    layers = []
    for layer, score in SCORES.items():
        entry = {"layer": layer, "score": score, "rank": ORDER.index(layer) + 1, "metrics": {}, "modules": {}}
        if with_groups:
            entry["groups"] = GROUPS[layer]
        layers.append(entry)
    return {"spear_version": "0", "impact": {"name": "combined", "params": {}}, "num_layers": 8, "order": ORDER, "layers": layers}


@pytest.fixture
def ranking():
    return parse_ranking(ranking_doc())


def expected(selected: dict[int, float]) -> dict[int, float]:
    return {layer: selected.get(layer, 0.0) for layer in range(8)}


def test_conservative_balanced_aggressive(ranking):
    assert build_tmap(ranking, {"name": "conservative"}).layer_t == expected({5: 0.5, 2: 0.5})
    assert build_tmap(ranking, {"name": "aggressive"}).layer_t == expected({5: 1, 2: 1, 7: 1, 0: 1, 3: 1, 6: 1})
    bal = build_tmap(ranking, {"name": "balanced"})
    assert bal.layer_t == pytest.approx(expected({5: 1.0, 2: 0.8, 7: 0.6, 0: 0.55}))
    half = build_tmap(ranking, {"name": "balanced", "t_max": 0.5, "fraction": 0.25})
    assert half.layer_t == pytest.approx(expected({5: 0.5, 2: 0.4}))
    mm = build_tmap(ranking, {"name": "balanced", "normalise": "minmax"})
    assert mm.layer_t == pytest.approx(expected({5: 1.0, 2: 0.7 / 0.9, 7: 0.5 / 0.9, 0: 0.45 / 0.9}))


def test_fractions_round_up_and_are_overridable(ranking):
    assert sum(t > 0 for t in build_tmap(ranking, {"name": "conservative", "fraction": 0.3}).layer_t.values()) == 3
    assert build_tmap(ranking, {"name": "aggressive", "fraction": 0.0}).layer_t == expected({})
    assert build_tmap(ranking, {"name": "conservative", "t": 0.2, "fraction": 1.0}).layer_t == {i: 0.2 for i in range(8)}


def test_top_k_threshold_uniform_layers(ranking):
    assert build_tmap(ranking, {"name": "top_k", "k": 3, "t": 0.7}).layer_t == expected({5: 0.7, 2: 0.7, 7: 0.7})
    assert build_tmap(ranking, {"name": "threshold", "threshold": 0.55, "t": 1.0}).layer_t == expected({5: 1, 2: 1, 7: 1})
    assert build_tmap(None, {"name": "uniform", "t": 0.25}, num_layers=8).layer_t == {i: 0.25 for i in range(8)}
    assert build_tmap(None, {"name": "layers", "layers": [0, 7], "t": 0.9}, num_layers=8).layer_t == expected({0: 0.9, 7: 0.9})


def test_non_layer_t_and_mean_t(ranking):
    tm = build_tmap(ranking, {"name": "conservative", "non_layer_t": 0.1})
    assert tm.non_layer_t == 0.1
    assert tm.mean_t() == pytest.approx(1.0 / 8)
    assert TMap({3: 1.0}).mean_t() == 1.0 and TMap({3: 1.0}).mean_t(num_layers=4) == 0.25


def test_module_granularity_ranks_groups(ranking):
    tm = build_tmap(ranking, {"name": "top_k", "k": 3, "t": 1.0, "granularity": "module"})
    # group scores: attn = score, mlp = score/2 -> top 3 units: 5.attn (1.0), 2.attn (0.8), 7.attn (0.6)
    assert {k for k, v in tm.group_t.items() if v > 0} == {(5, "attn"), (2, "attn"), (7, "attn")}
    assert tm.layer_t[5] == 0.5 and tm.layer_t[4] == 0.0  # layer t = mean of its groups
    bal = build_tmap(ranking, {"name": "balanced", "granularity": "module"})  # top 8 of 16 units
    # 5a 2a 7a 0a, then 5m and 3a tie at 0.5 (5 ranks first), 2m 0.4, 7m and 6a tie at 0.3 (7 first)
    assert {k for k, v in bal.group_t.items() if v > 0} == {
        (5, "attn"), (2, "attn"), (7, "attn"), (0, "attn"), (5, "mlp"), (3, "attn"), (2, "mlp"), (7, "mlp")
    }
    assert bal.group_t[(5, "attn")] == 1.0 and bal.group_t[(5, "mlp")] == pytest.approx(0.5)
    assert bal.layer_t[5] == pytest.approx(0.75)
    lay = build_tmap(None, {"name": "layers", "layers": [1, "2.mlp"], "t": 1.0, "granularity": "module"}, num_layers=4)
    assert {k for k, v in lay.group_t.items() if v > 0} == {(1, "attn"), (1, "mlp"), (2, "mlp")}


def test_module_granularity_needs_group_scores():
    with pytest.raises(SpearError, match="granularity=layer"):
        build_tmap(parse_ranking(ranking_doc(with_groups=False)), {"name": "balanced", "granularity": "module"})


def test_t_for_follows_layers_groups_and_non_layer(tiny_llama_dir):
    from transformers import AutoConfig

    from spear.models import layer_map_for

    lmap = layer_map_for(AutoConfig.from_pretrained(tiny_llama_dir))
    tm = TMap({1: 0.5}, {(1, "attn"): 0.2, (1, "mlp"): 0.8}, 0.1)
    assert tm.t_for("model.layers.1.self_attn.q_proj.weight", lmap) == 0.2
    assert tm.t_for("model.layers.1.self_attn.q_proj.bias", lmap) == 0.2  # inside self_attn
    assert tm.t_for("model.layers.1.self_attn.q_norm.weight", lmap) == 0.2
    assert tm.t_for("model.layers.1.mlp.down_proj.weight", lmap) == 0.8
    assert tm.t_for("model.layers.1.input_layernorm.weight", lmap) == 0.5  # layer norms: layer t
    assert tm.t_for("model.layers.2.mlp.up_proj.weight", lmap) == 0.0
    for name in ("model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"):
        assert tm.t_for(name, lmap) == 0.1
    plain = TMap({1: 0.5})
    assert plain.t_for("model.layers.1.mlp.down_proj.weight", lmap) == 0.5
    assert plain.t_for("model.layers.1.post_attention_layernorm.weight", lmap) == 0.5


def test_tmap_json_round_trip_and_validation():
    tm = TMap({0: 0.5, 3: 1.0}, {(0, "attn"): 0.25, (0, "mlp"): 0.75}, 0.1)
    back = TMap.from_json(json.dumps(tm.to_json()))
    assert back == tm
    for bad in ({0: 1.5}, {0: -0.1}, {0: float("nan")}):
        with pytest.raises(SpearError, match=r"\[0, 1\]"):
            TMap(bad)
    with pytest.raises(SpearError, match="non_layer_t"):
        TMap({}, None, 2.0)
    with pytest.raises(SpearError, match="policy.t"):
        build_tmap(None, {"name": "uniform", "t": 1.2}, num_layers=4)


def test_bad_policy_settings(ranking):
    with pytest.raises(SpearError, match="policy="):
        build_tmap(ranking, {"name": "nope"})
    with pytest.raises(SpearError, match="ranking="):
        build_tmap(None, {"name": "balanced"}, num_layers=8)
    with pytest.raises(SpearError, match="policy.k"):
        build_tmap(ranking, {"name": "top_k", "k": 9})
    with pytest.raises(SpearError, match="policy.granularity"):
        build_tmap(ranking, {"name": "balanced", "granularity": "row"})
    with pytest.raises(SpearError, match="8 layers"):
        build_tmap(ranking, {"name": "balanced"}, num_layers=30)
    with pytest.raises(SpearError, match="not a layer"):
        build_tmap(None, {"name": "layers", "layers": [9]}, num_layers=8)
    with pytest.raises(SpearError, match="granularity=module"):
        build_tmap(None, {"name": "layers", "layers": ["1.attn"]}, num_layers=8)


def test_parse_ranking_defaults_and_errors(tmp_path):
    doc = ranking_doc()
    del doc["order"]
    assert parse_ranking(doc).order == ORDER
    doc["layers"][0]["score"] = None  # a missing score ranks last
    assert parse_ranking(doc).order[-1] == 0
    path = tmp_path / "ranking.json"
    path.write_text(json.dumps(ranking_doc()))
    assert load_ranking(tmp_path).order == ORDER
    with pytest.raises(SpearError, match="does not exist"):
        load_ranking(tmp_path / "missing.json")
    bad = ranking_doc()
    bad["order"] = [0, 1]
    with pytest.raises(SpearError, match="order"):
        parse_ranking(bad)
    with pytest.raises(SpearError, match="layers"):
        parse_ranking({"order": []})


def test_normalised_scores_degenerate():
    assert normalised_scores({0: 0.0, 1: 0.0}) == {0: 1.0, 1: 1.0}
    assert normalised_scores({0: 2.0, 1: 2.0}, "minmax") == {0: 1.0, 1: 1.0}
    assert normalised_scores({0: -1.0, 1: 2.0}) == {0: 0.0, 1: 1.0}


def test_search_scale_bisects_to_the_smallest_sufficient_scale():
    found = search_scale(lambda s: s**2, 0.25, tol=1e-3)
    assert found["reached"] and found["scale"] == pytest.approx(0.5, abs=1e-3) and found["scale"] >= 0.5
    assert search_scale(lambda s: 1.0, 0.5)["scale"] == 0.0
    miss = search_scale(lambda s: s, 2.0)
    assert not miss["reached"] and miss["scale"] == 1.0
    assert TMap({0: 0.8, 1: 0.2}).scaled(2.0).layer_t == {0: 1.0, 1: 0.4}
