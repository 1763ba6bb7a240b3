"""Model references, loading safety (safetensors only, no remote code) and the layer map."""

from __future__ import annotations

import subprocess
import sys
import time

import pytest
import torch

from spear.errors import SpearError
from spear.models import layer_map_for, load_model, resolve_model_dir
from spear.models.layer_map import FAMILIES, LLAMA_STYLE_MODULES
from spear.models.tiny import build_tiny, save_tiny


def test_import_spear_is_light():
    code = "import sys, spear; assert 'torch' not in sys.modules, 'import spear pulled in torch'"
    start = time.perf_counter()
    subprocess.run([sys.executable, "-c", code], check=True)
    assert time.perf_counter() - start < 5  # generous: the property is "no torch at import"


@pytest.mark.parametrize("alias", ["tiny_llama", "tiny_gemma"])
def test_layer_map_covers_every_matrix_of_tiny_models(alias):
    model, _ = build_tiny(alias)
    lmap = layer_map_for(model.config)
    assert lmap.num_layers == 4
    matrices = {}
    for name, param in model.named_parameters():
        ref = lmap.matrix_of(name)
        if param.ndim == 2 and name.startswith("model.layers."):
            assert ref is not None, f"layer matrix {name} not mapped"
            matrices.setdefault(ref.layer, set()).add(ref.module)
        else:
            assert ref is None, f"{name} is not a layer matrix"
    assert matrices == {layer: set(LLAMA_STYLE_MODULES) for layer in range(4)}
    assert lmap.layer_of("model.layers.3.input_layernorm.weight") == 3
    assert lmap.layer_of("model.embed_tokens.weight") is None
    assert lmap.layer_of("model.norm.weight") is None


def test_layer_map_is_anchored():
    lmap = layer_map_for(build_tiny("tiny_llama")[0].config)
    assert lmap.matrix_of("model.layers.1.self_attn.q_proj.weight").group == "attn"
    assert lmap.matrix_of("model.layers.1.mlp.down_proj.weight").group == "mlp"
    assert lmap.matrix_of("xmodel.layers.1.mlp.down_proj.weight") is None
    assert lmap.matrix_of("model.layers.1.mlp.down_proj.weight.extra") is None
    assert lmap.matrix_of("model.layers.1.self_attn.q_proj.bias") is None
    # multimodal wrappers (Gemma3) nest the text layers
    assert lmap.matrix_of("model.language_model.layers.2.mlp.up_proj.weight").layer == 2


def test_every_family_has_an_entry_for_its_model_types():
    from transformers import AutoConfig

    for spec in FAMILIES:
        for model_type in spec.model_types:
            if model_type == "gemma3":  # multimodal config; its text part is gemma3_text
                continue
            cfg = AutoConfig.for_model(model_type, num_hidden_layers=3)
            assert layer_map_for(cfg).family == spec.name


def test_unknown_architecture_says_how_to_add_it():
    from transformers import AutoConfig

    with pytest.raises(SpearError, match=r"FAMILIES in spear/models/layer_map.py"):
        layer_map_for(AutoConfig.for_model("gpt2"))


def test_tiny_alias_loads_and_is_deterministic(tmp_path, monkeypatch):
    monkeypatch.setenv("SPEAR_HOME", str(tmp_path))
    model, tok = load_model("tiny_llama")
    again, _ = load_model("tiny_llama")
    for (name, a), (_, b) in zip(model.state_dict().items(), again.state_dict().items(), strict=True):
        assert torch.equal(a, b), name
    ids = tok("debit and credit", return_tensors="pt").input_ids
    loss = model(input_ids=ids, labels=ids).loss
    assert torch.isfinite(loss)
    assert (tmp_path / "models" / "tiny_llama" / "model.safetensors").exists()


def test_local_dir_loads(tiny_llama_dir):
    model, tok = load_model(str(tiny_llama_dir))
    assert model.config.num_hidden_layers == 4
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()


def test_pickle_checkpoint_is_refused_unless_allowed(tmp_path):
    model, tok = build_tiny("tiny_llama")
    pkl = tmp_path / "pkl"  # transformers 5 only writes safetensors: write the pickle by hand
    pkl.mkdir()
    model.config.save_pretrained(pkl)
    torch.save(model.state_dict(), pkl / "pytorch_model.bin")
    tok.save_pretrained(pkl)
    with pytest.raises(SpearError, match=r"model.allow_pickle=true"):
        resolve_model_dir(str(tmp_path / "pkl"))
    assert resolve_model_dir(str(tmp_path / "pkl"), allow_pickle=True) == tmp_path / "pkl"
    torch.save({}, tmp_path / "weights.pt")
    with pytest.raises(SpearError, match=r"pickle"):
        resolve_model_dir(str(tmp_path / "weights.pt"))


def test_hub_id_needs_network_opt_in(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(SpearError, match=r"model.allow_network=true"):
        resolve_model_dir("meta-llama/Llama-3.1-8B")
    with pytest.raises(SpearError, match=r"model.allow_network=true"):
        resolve_model_dir("meta-llama/Llama-3.1-8B", allow_network=True)  # HF_HUB_OFFLINE wins


def test_unknown_reference_lists_aliases():
    with pytest.raises(SpearError, match=r"smollm2_135m"):
        resolve_model_dir("no_such_model_anywhere")


def test_trust_remote_code_is_off_by_default(tiny_llama_dir, monkeypatch):
    import transformers

    seen = {}
    original = transformers.AutoModelForCausalLM.from_pretrained

    def spy(*args, **kwargs):
        seen.update(kwargs)
        return original(*args, **kwargs)

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", spy)
    load_model(str(tiny_llama_dir))
    assert seen["trust_remote_code"] is False
    assert seen["use_safetensors"] is True


def test_gguf_file_is_converted_once(tmp_path, monkeypatch):
    from spear.models import gguf

    calls = []

    def fake_convert(path, out):
        calls.append(path)
        save_tiny("tiny_llama", out)
        return out

    monkeypatch.setenv("SPEAR_HOME", str(tmp_path / "home"))
    monkeypatch.setattr(gguf, "convert_gguf", fake_convert)
    f = tmp_path / "m.gguf"
    f.write_bytes(b"GGUF-not-really")
    first = resolve_model_dir(str(f))
    second = resolve_model_dir(str(f))
    assert first == second and len(calls) == 1 and (first / "config.json").exists()
