"""Freeze planning (pure): modes, module limits, embeddings, rankings, and one-line errors."""

from __future__ import annotations

import json

import pytest

from spear.config.schema import GROUP_OPTIONS, FreezeConfig
from spear.config.store import validate_node
from spear.cpt.freeze import apply_freeze, plan_for_model, plan_freeze, ranking_for, resolve_modules
from spear.errors import SpearError
from spear.models import layer_map_for
from spear.models.tiny import build_tiny


@pytest.fixture(scope="module")
def tiny():
    model, _ = build_tiny("tiny_llama")
    return model, layer_map_for(model.config)


def freeze(**values) -> FreezeConfig:
    """A validated freeze config: the mode's option with ``values`` (as freeze.<key>=... would)."""
    option = GROUP_OPTIONS["freeze"].get(values.get("mode", "none"), FreezeConfig())
    return validate_node(FreezeConfig, {**option.model_dump(), **values}, "freeze")


def _plan(tiny, **cfg):
    model, lmap = tiny
    ranking = cfg.pop("_ranking", None)
    return plan_for_model(freeze(**cfg), model, lmap, ranking)


def _layers_of(names):
    return sorted({int(n.split(".")[2]) for n in names if n.startswith("model.layers.")})


@pytest.mark.parametrize(
    "cfg, layers",
    [
        ({"mode": "none"}, []),
        ({"mode": "first", "k": 1}, [0]),
        ({"mode": "last", "k": 2}, [2, 3]),
        ({"mode": "last", "k": 0}, []),
        ({"mode": "layers", "layers": [3, 0, 3]}, [0, 3]),
        ({"mode": "ranked", "k": 2, "_ranking": [2, 0, 3, 1]}, [0, 2]),
        ({"mode": "ranked", "k": 4, "_ranking": [2, 0, 3, 1]}, [0, 1, 2, 3]),
    ],
)
def test_modes_select_layers(tiny, cfg, layers):
    plan = _plan(tiny, **cfg)
    assert list(plan.frozen_layers) == layers
    assert _layers_of(plan.frozen_params) == layers
    # modules=all: every parameter of a frozen layer, norms included (9 tensors per Llama layer)
    assert len(plan.frozen_params) == 9 * len(layers)
    assert set(plan.frozen_params).isdisjoint(plan.trainable_params)
    assert len(plan.frozen_params) + len(plan.trainable_params) == len(list(tiny[0].named_parameters()))


def test_module_limits(tiny):
    attn = _plan(tiny, mode="first", k=2, modules="attn")
    assert len(attn.frozen_params) == 2 * 4 and all(".self_attn." in n for n in attn.frozen_params)
    assert "model.layers.0.input_layernorm.weight" in attn.trainable_params
    mlp = _plan(tiny, mode="first", k=1, modules="mlp")
    assert {n.split(".")[-2] for n in mlp.frozen_params} == {"gate_proj", "up_proj", "down_proj"}
    names = _plan(tiny, mode="layers", layers=[1], modules=["self_attn.q_proj", "down_proj"])
    assert names.frozen_params == ("model.layers.1.self_attn.q_proj.weight", "model.layers.1.mlp.down_proj.weight")
    assert names.modules == ("mlp.down_proj", "self_attn.q_proj") and names.notes
    assert resolve_modules("q_proj,k_proj", tiny[1].modules) == ("self_attn.k_proj", "self_attn.q_proj")


def test_tied_embeddings_freeze_together(tiny):
    model, _ = tiny
    assert model.get_input_embeddings().weight is model.get_output_embeddings().weight
    for choice in ("input", "output", "both", True):
        plan = _plan(tiny, mode="none", embeddings=choice)
        assert plan.frozen_params == ("model.embed_tokens.weight",)
        assert plan.tied_embeddings and any("tied" in n for n in plan.notes)
    assert _plan(tiny, mode="none", embeddings=False).frozen_params == ()


def test_untied_output_embedding_is_separate():
    names = ["model.embed_tokens.weight", "model.layers.0.mlp.up_proj.weight", "lm_head.weight"]
    lmap = layer_map_for(build_tiny("tiny_llama")[0].config)
    plan = plan_freeze(freeze(mode="none", embeddings="output"), lmap, names,
                       input_embedding=names[0], output_embedding="lm_head.weight", tied=False)
    assert plan.frozen_params == ("lm_head.weight",) and not plan.notes


def test_apply_freeze_sets_requires_grad():
    model, _ = build_tiny("tiny_llama")
    lmap = layer_map_for(model.config)
    plan = plan_for_model(freeze(mode="last", k=1), model, lmap)
    counts = apply_freeze(model, plan)
    frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
    assert frozen == set(plan.frozen_params)
    assert counts["frozen"] == sum(p.numel() for n, p in model.named_parameters() if n in frozen)
    assert counts["total"] == sum(p.numel() for p in model.parameters())


def _ranking_file(path, order):
    """A ranking.json (SPEC §2.4) whose scores give ``order``."""
    scores = {layer: 1.0 - i / len(order) for i, layer in enumerate(order)}
    path.write_text(json.dumps({"spear_version": "0", "num_layers": len(order), "order": order,
                                "layers": [{"layer": layer, "score": scores[layer]} for layer in range(len(order))]}))
    return path


def test_ranking_for_reads_the_ranking(tmp_path):
    path = _ranking_file(tmp_path / "ranking.json", [3, 1, 0, 2])
    order, source = ranking_for(freeze(mode="ranked", k=1, ranking=str(path)), tmp_path, 4)
    assert order == [3, 1, 0, 2] and source == str(path)
    assert ranking_for(freeze(mode="ranked", k=1, ranking=str(tmp_path)), tmp_path, 4)[0] == [3, 1, 0, 2]  # its dir
    assert ranking_for(freeze(mode="last", k=1), tmp_path, 4) == (None, None)


@pytest.mark.parametrize(
    "cfg, match",
    [
        ({"mode": "last", "k": 5}, "freeze.k=5 is out of range: the model has 4 layers"),
        ({"mode": "first", "k": -1}, "freeze.k=-1: input should be greater than or equal to 0"),
        ({"mode": "last", "k": None}, "needs freeze.k"),
        ({"mode": "layers", "layers": [4]}, "outside"),
        ({"mode": "layers", "layers": None}, "needs freeze.layers"),
        ({"mode": "diagonal"}, "freeze.mode='diagonal': input should be 'none', 'ranked'"),
        ({"mode": "last", "k": 1, "modules": "self_attn.x_proj"}, "'self_attn.x_proj' is unknown"),
        ({"mode": "last", "k": 1, "modules": "proj"}, "unknown"),
        ({"mode": "last", "k": 1, "modules": ["all", "attn"]}, "mixes 'all'"),
        ({"mode": "none", "embeddings": "sideways"}, "freeze.embeddings='sideways'"),
        ({"mode": "ranked", "k": 1, "_ranking": [0, 0, 1, 2]}, "distinct"),
    ],
)
def test_bad_configs_are_one_line_errors(tiny, cfg, match):
    with pytest.raises(SpearError, match=match) as err:
        _plan(tiny, **cfg)
    assert "\n" not in str(err.value)


def test_bad_ranking_files(tmp_path):
    def load(path):
        return ranking_for(freeze(mode="ranked", k=1, ranking=str(path)), tmp_path, 4)

    wrong = _ranking_file(tmp_path / "r30.json", list(range(30)))
    with pytest.raises(SpearError, match="has 30 layers but the model has 4; set freeze.ranking") as err:
        load(wrong)
    assert "\n" not in str(err.value)
    with pytest.raises(SpearError, match="does not exist"):
        load(tmp_path / "missing.json")
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(SpearError, match="freeze.ranking=.*not valid JSON"):
        load(tmp_path / "bad.json")
    (tmp_path / "noorder.json").write_text("{}")
    with pytest.raises(SpearError, match="no `layers` list"):
        load(tmp_path / "noorder.json")


def test_ranked_without_ranking_uses_spectrum_snr(tiny_llama_dir, caplog):
    """Fallback of freeze=ranked without freeze.ranking: the base model's Spectrum SNR ranking."""
    import logging

    with caplog.at_level(logging.INFO, logger="spear.cpt.freeze"):
        order, source = ranking_for(freeze(mode="ranked", k=2), tiny_llama_dir, 4)
    assert sorted(order) == [0, 1, 2, 3] and source.startswith("spectrum_snr")
    assert "Spectrum SNR" in caplog.text
