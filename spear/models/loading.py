"""Resolve a model reference to an HF safetensors dir, and load model + tokenizer from it.

A reference is one of: an alias (``smollm2_135m``, prepared by ``python -m spear.assets``;
``tiny_llama``/``tiny_gemma``, built from a config on first use), a local HF dir, a ``.gguf``
file (converted once into the cache), or a hub id (only with ``allow_network`` and
``HF_HUB_OFFLINE`` unset). Every stage goes through HF safetensors dirs, so analysis and merge
can stream tensors instead of loading models. Pickle checkpoints are refused unless allowed.
"""

from __future__ import annotations

import os
from pathlib import Path

from spear.errors import SpearError
from spear.io.atomic import atomic_dir
from spear.io.hashing import file_sha256
from spear.models.tiny import TINY_SPECS, save_tiny
from spear.paths import spear_home

# Aliases of prepared assets, relative to the cache (``spear.assets`` writes them).
ASSET_ALIASES: dict[str, str] = {"smollm2_135m": "models/smollm2_135m"}
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
DTYPES = ("float32", "bfloat16", "float16", "auto")


def known_aliases() -> list[str]:
    return sorted([*ASSET_ALIASES, *TINY_SPECS])


def check_weights_format(model_dir: Path, allow_pickle: bool = False) -> None:
    """A dir must hold safetensors weights; pickle weights only with ``allow_pickle``."""
    if any(model_dir.glob("*.safetensors")):
        return
    pickles = [p.name for p in model_dir.iterdir() if p.suffix in PICKLE_SUFFIXES]
    if pickles and not allow_pickle:
        raise SpearError(
            f"{model_dir} holds only pickle weights ({', '.join(sorted(pickles))}), which can run code when "
            "loaded; convert them to safetensors, or set model.allow_pickle=true if you trust the source"
        )
    if not pickles:
        raise SpearError(f"{model_dir} holds no model weights (*.safetensors); point to an HF model dir")


def _hub_allowed(allow_network: bool) -> bool:
    return allow_network and os.environ.get("HF_HUB_OFFLINE", "0") not in ("1", "true", "True")


def resolve_model_dir(ref: str, *, allow_pickle: bool = False, allow_network: bool = False) -> Path:
    """The local HF dir for a model reference, preparing it in the cache when needed."""
    ref = str(ref)
    if ref in TINY_SPECS:
        out = spear_home() / "models" / ref
        if not out.exists():
            with atomic_dir(out, overwrite=True) as tmp:
                save_tiny(ref, tmp)
        return out
    if ref in ASSET_ALIASES:
        out = spear_home() / ASSET_ALIASES[ref]
        if not (out / "config.json").exists():
            raise SpearError(f"model alias {ref!r} is not prepared in {out}: run `python -m spear.assets` (or `make setup`)")
        return out
    path = Path(ref).expanduser()
    if path.is_dir():
        check_weights_format(path, allow_pickle)
        return path
    if path.is_file() and path.suffix == ".gguf":
        from spear.models.gguf import convert_gguf

        out = spear_home() / "models" / f"gguf-{path.stem}-{file_sha256(path)[:12]}"
        return out if (out / "config.json").exists() else convert_gguf(path, out)
    if path.is_file() and path.suffix in PICKLE_SUFFIXES:
        raise SpearError(
            f"{path} is a pickle checkpoint, which can run code when loaded; convert it to safetensors, "
            "or put it in an HF dir and set model.allow_pickle=true if you trust the source"
        )
    if path.exists():
        raise SpearError(f"{path} is not a model: expected an HF dir, a .gguf file or an alias ({', '.join(known_aliases())})")
    if ref.count("/") == 1 and not ref.startswith((".", "/", "~")):
        if not _hub_allowed(allow_network):
            raise SpearError(
                f"{ref!r} is not a local model and downloads are off; set model.allow_network=true and "
                "HF_HUB_OFFLINE=0 to fetch it from the hub, or point to a local dir"
            )
        from huggingface_hub import snapshot_download

        patterns = ["*.json", "*.safetensors", "tokenizer*", "*.model", "*.txt"]
        if allow_pickle:
            patterns.append("*.bin")
        return Path(snapshot_download(ref, allow_patterns=patterns))
    raise SpearError(f"model {ref!r} not found: not an alias ({', '.join(known_aliases())}), a local dir or a .gguf file")


def max_positions(model) -> int | None:
    """The longest sequence the model's position embeddings cover (``None`` where its config does not say)."""
    config = getattr(model, "config", None)
    config = getattr(config, "text_config", None) or config
    value = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)
    return int(value) if value else None


def torch_dtype(name: str):
    import torch

    if name not in DTYPES:
        raise SpearError(f"model.dtype={name!r} is not one of {', '.join(DTYPES)}")
    return "auto" if name == "auto" else getattr(torch, name)


def load_tokenizer(model_dir: Path, *, trust_remote_code: bool = False):
    """The model dir's tokenizer; a dir without one is a one-line error (every stage needs it)."""
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(str(model_dir), trust_remote_code=trust_remote_code)
    except (OSError, ValueError, TypeError) as err:
        if "trust_remote_code" in str(err):
            raise SpearError(f"the tokenizer of {model_dir} needs its own Python code; set model.trust_remote_code=true "
                             "if you trust the source") from None
        raise SpearError(f"{model_dir} has no usable tokenizer ({str(err).splitlines()[0][:160]}); copy the tokenizer "
                         "files of its base model (tokenizer.json, tokenizer_config.json, ...) into it") from None
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def check_loaded_weights(model, model_dir: Path) -> None:
    """Every floating parameter finite: a NaN/Inf weight is an error naming the tensor, not a NaN loss later."""
    import torch

    for name, param in model.named_parameters():
        if param.is_floating_point() and not bool(torch.isfinite(param).all()):
            raise SpearError(f"{model_dir}: tensor {name} holds NaN or Inf values; the checkpoint is corrupt or diverged, "
                             "use another model (or an earlier checkpoint)")


def load_model(
    ref: str,
    *,
    dtype: str = "float32",
    allow_pickle: bool = False,
    trust_remote_code: bool = False,
    allow_network: bool = False,
):
    """(model in eval mode, tokenizer) for a model reference; see the module docstring.

    Loading is guarded as the streaming stages are: safetensors headers and sizes are checked
    before transformers reads them, remote code needs ``model.trust_remote_code``, every weight must
    be finite and the dir must hold a tokenizer; each problem is one ``SpearError`` line.
    """
    from transformers import AutoModelForCausalLM

    from spear.io.reader import Checkpoint

    model_dir = resolve_model_dir(ref, allow_pickle=allow_pickle, allow_network=allow_network)
    if any(model_dir.glob("*.safetensors")):
        Checkpoint(model_dir).close()  # a truncated or corrupt file: one line, before transformers reads it
    try:
        model = AutoModelForCausalLM.from_pretrained(
            str(model_dir), dtype=torch_dtype(dtype), use_safetensors=not allow_pickle, trust_remote_code=trust_remote_code,
        )
    except ValueError as err:
        if "trust_remote_code" not in str(err):
            raise
        raise SpearError(f"{model_dir} needs its own Python code to load; set model.trust_remote_code=true if you "
                         "trust the source (it runs that code)") from None
    check_loaded_weights(model, model_dir)
    return model.eval(), load_tokenizer(model_dir, trust_remote_code=trust_remote_code)
