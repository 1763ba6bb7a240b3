"""Policies: expected t maps on a fixed ranking, TMap semantics, ranking parsing, target search."""

from __future__ import annotations

import json

import pytest

from spear.analysis.ranking import Ranking, Unit
from spear.config.schema import SlerpMerge
from spear.errors import SpearError
from spear.merging.controls import policy_from_spec
from spear.merging.plan import MergePlan, TMap
from spear.merging.policies import build_tmap, normalised_scores, search_scale

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
    return Ranking.from_document(ranking_doc())


def policy(name: str, **values):
    """A validated policy config: the option's defaults with ``values`` (as policy.<key>=... would)."""
    return policy_from_spec({"policy": name, **values})


def tmap(ranking, name: str, num_layers: int = 8, **values) -> TMap:
    return build_tmap(ranking, policy(name, **values), num_layers)


def expected(selected: dict[int, float]) -> dict[int, float]:
    return {layer: selected.get(layer, 0.0) for layer in range(8)}


def test_conservative_balanced_aggressive(ranking):
    assert tmap(ranking, "conservative").layer_t == expected({5: 0.5, 2: 0.5})
    assert tmap(ranking, "aggressive").layer_t == expected({5: 1, 2: 1, 7: 1, 0: 1, 3: 1, 6: 1})
    bal = tmap(ranking, "balanced")
    assert bal.layer_t == pytest.approx(expected({5: 1.0, 2: 0.8, 7: 0.6, 0: 0.55}))
    half = tmap(ranking, "balanced", t_max=0.5, fraction=0.25)
    assert half.layer_t == pytest.approx(expected({5: 0.5, 2: 0.4}))
    mm = tmap(ranking, "balanced", normalise="minmax")
    assert mm.layer_t == pytest.approx(expected({5: 1.0, 2: 0.7 / 0.9, 7: 0.5 / 0.9, 0: 0.45 / 0.9}))


def test_fractions_round_up_and_are_overridable(ranking):
    assert sum(t > 0 for t in tmap(ranking, "conservative", fraction=0.3).layer_t.values()) == 3
    assert tmap(ranking, "aggressive", fraction=0.0).layer_t == expected({})
    assert tmap(ranking, "conservative", t=0.2, fraction=1.0).layer_t == {i: 0.2 for i in range(8)}


def test_top_k_threshold_uniform_layers(ranking):
    assert tmap(ranking, "top_k", k=3, t=0.7).layer_t == expected({5: 0.7, 2: 0.7, 7: 0.7})
    assert tmap(ranking, "threshold", threshold=0.55, t=1.0).layer_t == expected({5: 1, 2: 1, 7: 1})
    assert tmap(None, "uniform", num_layers=8, t=0.25).layer_t == {i: 0.25 for i in range(8)}
    assert tmap(None, "layers", layers=[0, 7], t=0.9).layer_t == expected({0: 0.9, 7: 0.9})


def test_lines_is_linear_in_depth_without_a_ranking():
    lines = tmap(None, "lines", t_first=0.9, t_last=0.1)
    assert lines.layer_t == pytest.approx({layer: 0.9 - 0.8 * layer / 7 for layer in range(8)})
    assert tmap(None, "lines").layer_t[0] == 1.0 and tmap(None, "lines").layer_t[7] == 0.0  # the defaults
    grouped = tmap(None, "lines", num_layers=4, granularity="module", t_first=0.6, t_last=0.0)
    assert grouped.group_t[(1, "attn")] == grouped.group_t[(1, "mlp")] == pytest.approx(0.4)
    assert tmap(None, "lines", num_layers=1).layer_t == {0: 1.0}


def test_non_layer_t_and_mean_t(ranking):
    tm = tmap(ranking, "conservative", non_layer_t=0.1)
    assert tm.non_layer_t == 0.1
    assert tm.mean_t(8) == pytest.approx(1.0 / 8)
    assert TMap.of_layers({3: 1.0}).mean_t(num_layers=4) == 0.25


def test_module_granularity_ranks_groups(ranking):
    tm = tmap(ranking, "top_k", k=3, t=1.0, granularity="module")
    # group scores: attn = score, mlp = score/2 -> top 3 units: 5.attn (1.0), 2.attn (0.8), 7.attn (0.6)
    assert {k for k, v in tm.group_t.items() if v > 0} == {(5, "attn"), (2, "attn"), (7, "attn")}  # Unit == tuple
    assert tm.layer_t[5] == 0.5 and tm.layer_t[4] == 0.0  # layer t = mean of its groups
    bal = tmap(ranking, "balanced", granularity="module")  # top 8 of 16 units
    # 5a 2a 7a 0a, then 5m and 3a tie at 0.5 (5 ranks first), 2m 0.4, 7m and 6a tie at 0.3 (7 first)
    assert {k for k, v in bal.group_t.items() if v > 0} == {
        (5, "attn"), (2, "attn"), (7, "attn"), (0, "attn"), (5, "mlp"), (3, "attn"), (2, "mlp"), (7, "mlp")
    }
    assert bal.group_t[(5, "attn")] == 1.0 and bal.group_t[(5, "mlp")] == pytest.approx(0.5)
    assert bal.layer_t[5] == pytest.approx(0.75)
    lay = tmap(None, "layers", num_layers=4, layers=[1, "2.mlp"], t=1.0, granularity="module")
    assert {k for k, v in lay.group_t.items() if v > 0} == {(1, "attn"), (1, "mlp"), (2, "mlp")}


def test_module_granularity_needs_group_scores():
    with pytest.raises(SpearError, match="granularity=layer"):
        tmap(Ranking.from_document(ranking_doc(with_groups=False)), "balanced", granularity="module")


def test_merge_plan_follows_layers_groups_and_non_layer(tiny_llama_dir):
    from transformers import AutoConfig

    from spear.models import layer_map_for

    lmap = layer_map_for(AutoConfig.from_pretrained(tiny_llama_dir))
    names = ["model.layers.1.self_attn.q_proj.weight", "model.layers.1.self_attn.q_proj.bias",
             "model.layers.1.self_attn.q_norm.weight", "model.layers.1.mlp.down_proj.weight",
             "model.layers.1.input_layernorm.weight", "model.layers.1.post_attention_layernorm.weight",
             "model.layers.2.mlp.up_proj.weight", "model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"]
    tm = TMap({Unit(1): 0.5, Unit(1, "attn"): 0.2, Unit(1, "mlp"): 0.8}, 0.1)
    plan = MergePlan.build(tm, lmap, names, SlerpMerge(dot_threshold=0.9995))
    t = {name: plan[name].t for name in names}
    assert t["model.layers.1.self_attn.q_proj.weight"] == 0.2
    assert t["model.layers.1.self_attn.q_proj.bias"] == 0.2  # inside self_attn
    assert t["model.layers.1.self_attn.q_norm.weight"] == 0.2
    assert t["model.layers.1.mlp.down_proj.weight"] == 0.8
    assert t["model.layers.1.input_layernorm.weight"] == 0.5  # layer norms: the layer's own t
    assert t["model.layers.2.mlp.up_proj.weight"] == 0.0
    for name in ("model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"):
        assert t[name] == 0.1
    assert {(step.kernel, dict(step.params)["dot_threshold"]) for step in plan.steps.values()} == {("slerp", 0.9995)}
    plain = MergePlan.build(TMap.of_layers({1: 0.5}), lmap, names, SlerpMerge())
    assert plain["model.layers.1.mlp.down_proj.weight"].t == 0.5
    assert plain["model.layers.1.post_attention_layernorm.weight"].t == 0.5
    with pytest.raises(SpearError, match="layer 9"):
        MergePlan.build(TMap.of_layers({9: 1.0}), lmap, names, SlerpMerge())


def test_tmap_json_round_trip_and_validation():
    tm = TMap({Unit(0): 0.5, Unit(3): 1.0, Unit(0, "attn"): 0.25, Unit(0, "mlp"): 0.75}, 0.1)
    back = TMap.from_json(json.dumps(tm.to_json()))
    assert back == tm
    assert tm.to_json()["group_t"] == {"0.attn": 0.25, "0.mlp": 0.75}
    for bad in (1.5, -0.1, float("nan")):
        with pytest.raises(SpearError, match=r"\[0, 1\]"):
            TMap.of_layers({0: bad})
    with pytest.raises(SpearError, match="non_layer_t"):
        TMap({}, 2.0)
    with pytest.raises(SpearError, match="policy.t"):
        policy("uniform", t=1.2)


def test_bad_policy_settings(ranking):
    with pytest.raises(SpearError, match="policy: <one of"):
        policy("nope")
    with pytest.raises(SpearError, match="ranking="):
        tmap(None, "balanced")
    with pytest.raises(SpearError, match="policy.k"):
        tmap(ranking, "top_k", k=9)
    with pytest.raises(SpearError, match="granularity"):
        policy("balanced", granularity="row")
    with pytest.raises(SpearError, match="8 layers"):
        tmap(ranking, "balanced", num_layers=30)
    with pytest.raises(SpearError, match="not a unit"):
        tmap(None, "layers", layers=[9])
    with pytest.raises(SpearError, match="granularity=module"):
        tmap(None, "layers", layers=["1.attn"])


def test_ranking_defaults_and_errors(tmp_path):
    doc = ranking_doc()
    del doc["order"]
    assert Ranking.from_document(doc).order == tuple(ORDER)
    doc["layers"][0]["score"] = None  # a layer without a score cannot be placed
    with pytest.raises(SpearError, match="layer 0 has no finite score"):
        Ranking.from_document(doc)
    path = tmp_path / "ranking.json"
    path.write_text(json.dumps(ranking_doc()))
    assert Ranking.load(tmp_path).order == tuple(ORDER)
    with pytest.raises(SpearError, match="does not exist"):
        Ranking.load(tmp_path / "missing.json")
    bad = ranking_doc()
    bad["order"] = [0, 1]
    with pytest.raises(SpearError, match="order"):
        Ranking.from_document(bad)
    with pytest.raises(SpearError, match="layers"):
        Ranking.from_document({"order": []})


@pytest.mark.parametrize(("content", "match"), [
    (b"[1, 2, 3]", "top level is a list"),
    (json.dumps({"layers": [{"layer": "3", "score": 0.1}]}).encode(), "not an integer"),
    (b"\xff\xfe{}", "not UTF-8"),
    (b"{nope", "not valid JSON"),
])
def test_malformed_ranking_files_are_one_line_errors(tmp_path, content, match):
    path = tmp_path / "ranking.json"
    path.write_bytes(content)
    with pytest.raises(SpearError, match=match) as err:
        Ranking.load(path, key="freeze.ranking")
    assert "freeze.ranking=" in str(err.value) and "\n" not in str(err.value)


def test_permuted_ranking_moves_scores_not_values(ranking):
    shuffled = ranking.permuted(seed=3)
    assert sorted(shuffled.scores.values()) == sorted(ranking.scores.values())
    assert shuffled.scores != ranking.scores
    assert shuffled == ranking.permuted(seed=3)
    moved = {layer: next(m for m in shuffled.order if shuffled.scores[m] == ranking.scores[layer]) for layer in ranking.order}
    assert [moved[layer] for layer in ranking.order] == list(shuffled.order)  # the order follows the scores
    assert tmap(shuffled, "balanced").unit_t != tmap(ranking, "balanced").unit_t
    assert sorted(tmap(shuffled, "balanced").layer_t.values()) == sorted(tmap(ranking, "balanced").layer_t.values())


def test_normalised_scores_degenerate():
    assert normalised_scores({0: 0.0, 1: 0.0}) == {0: 1.0, 1: 1.0}  # any hashable unit
    assert normalised_scores({0: 2.0, 1: 2.0}, "minmax") == {0: 1.0, 1: 1.0}
    assert normalised_scores({0: -1.0, 1: 2.0}) == {0: 0.0, 1: 1.0}


def test_search_scale_bisects_to_the_smallest_sufficient_scale():
    found = search_scale(lambda s: s**2, 0.25, tol=1e-3)
    assert found["reached"] and found["scale"] == pytest.approx(0.5, abs=1e-3) and found["scale"] >= 0.5
    assert search_scale(lambda s: 1.0, 0.5)["scale"] == 0.0
    miss = search_scale(lambda s: s, 2.0)
    assert not miss["reached"] and miss["scale"] == 1.0
    assert TMap.of_layers({0: 0.8, 1: 0.2}).scaled(2.0).layer_t == {0: 1.0, 1: 0.4}
