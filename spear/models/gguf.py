"""GGUF -> HF safetensors conversion.

transformers dequantises a GGUF file on load but refuses to save such a model, so the model
is rebuilt from its config without ``quantization_config`` and given the dequantised state dict.
"""

from __future__ import annotations

from pathlib import Path

from spear.io.atomic import atomic_dir


def load_gguf(gguf_path: Path):
    """(model, tokenizer) dequantised to float32 from a ``.gguf`` file."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf_path = Path(gguf_path)
    folder, name = str(gguf_path.parent), gguf_path.name
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype="float32")
    return model.eval(), tokenizer


def convert_gguf(gguf_path: Path, out_dir: Path, overwrite: bool = False) -> Path:
    """Write ``gguf_path`` as an HF safetensors dir at ``out_dir`` (atomically).

    The weights are the GGUF's dequantised float32 tensors, unchanged: the converted model's
    outputs equal the GGUF-loaded model's. An existing ``out_dir`` is replaced only with
    ``overwrite`` (after the new dir is complete).
    """
    import torch
    from transformers import AutoModelForCausalLM

    loaded, tokenizer = load_gguf(gguf_path)
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.dtype = torch.float32
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(loaded.state_dict(), strict=True)
    model.tie_weights()
    with atomic_dir(Path(out_dir), overwrite=overwrite) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        if loaded.generation_config is not None:
            loaded.generation_config.save_pretrained(tmp)
    return out_dir
