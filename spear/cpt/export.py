"""Write the trained model as a complete HF dir (safetensors + tokenizer), atomically.

Single device and DDP: the module on rank 0 holds the full weights; it is saved as is.
FSDP: the full state dict is gathered to rank 0 (``strategy.lightning_module_state_dict``).
DeepSpeed: a final ZeRO checkpoint is written and consolidated to fp32 with Lightning's
``convert_zero_checkpoint_to_fp32_state_dict`` (the fp32 master weights, not the bf16 copies
the engine trains with). In both sharded cases the weights are loaded into a fresh copy of the
base model (so frozen parameters that a ZeRO checkpoint leaves out keep their base values,
which are by definition their trained values) and saved from there; tied weights stay tied.
"""

from __future__ import annotations

import logging
import tempfile
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch

from spear.errors import SpearError
from spear.io.atomic import atomic_dir

log = logging.getLogger(__name__)

MODULE_PREFIX = "model."  # CPTModule keeps the HF model in ``self.model``


def _strip(state: dict[str, Any]) -> dict[str, torch.Tensor]:
    out = {}
    for key, value in state.items():
        for wrapper in ("_forward_module.", "_fsdp_wrapped_module.", "_checkpoint_wrapped_module."):
            key = key.replace(wrapper, "")
        key = key.removeprefix("module.")
        if key.startswith(MODULE_PREFIX) and torch.is_tensor(value):
            out[key[len(MODULE_PREFIX) :]] = value
    return out


def save_hf_dir(model, tokenizer, out_dir: Path, *, overwrite: bool = False) -> Path:
    """``save_pretrained`` of model (safetensors) and tokenizer into ``out_dir``, atomically."""
    config = getattr(model, "config", None)
    restore_cache = getattr(config, "use_cache", None)
    if config is not None:
        config.use_cache = True
    try:
        with atomic_dir(Path(out_dir), overwrite=overwrite, knob="overwrite") as tmp:
            model.save_pretrained(tmp, safe_serialization=True)
            if tokenizer is not None:
                tokenizer.save_pretrained(tmp)
    finally:
        if config is not None and restore_cache is not None:
            config.use_cache = restore_cache
    return Path(out_dir)


def load_into_base(base_dir: Path, dtype, trained: dict[str, torch.Tensor], frozen: Iterable[str]):
    """A fresh base model with the trained tensors copied in; missing tensors must be frozen ones."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(base_dir), dtype=dtype)
    expected = dict(model.named_parameters())
    frozen = set(frozen)
    missing = [n for n in expected if n not in trained and n not in frozen]
    if missing:
        raise SpearError(f"the consolidated checkpoint lacks trained tensors {missing[:3]}...; export failed, keep the checkpoints")
    with torch.no_grad():
        for name, param in expected.items():
            if name in trained:
                param.copy_(trained[name].to(param.dtype))
    model.tie_weights()
    return model


def _deepspeed_state(trainer, ckpt_dir: Path) -> dict[str, torch.Tensor] | None:
    from pytorch_lightning.utilities.deepspeed import convert_zero_checkpoint_to_fp32_state_dict

    final = ckpt_dir / "final-zero"
    trainer.save_checkpoint(str(final))  # collective: every rank writes its shard
    trainer.strategy.barrier("spear-export")
    if not trainer.is_global_zero:
        return None
    with tempfile.TemporaryDirectory(dir=ckpt_dir) as tmp:
        out_file = Path(tmp) / "fp32.pt"
        client = convert_zero_checkpoint_to_fp32_state_dict(str(final), str(out_file))
        return _strip(client["state_dict"])


def gather_trained_model(trainer, module, *, base_dir: Path, dtype, frozen: Iterable[str], ckpt_dir: Path):
    """The trained HF model on rank 0 (``None`` on other ranks), whatever the strategy."""
    from pytorch_lightning.strategies import DeepSpeedStrategy, FSDPStrategy

    strategy = trainer.strategy
    if isinstance(strategy, DeepSpeedStrategy):
        state = _deepspeed_state(trainer, Path(ckpt_dir))
    elif isinstance(strategy, FSDPStrategy):
        full = strategy.lightning_module_state_dict()  # collective; full state on rank 0
        state = _strip(full) if trainer.is_global_zero else None
    else:
        return module.model if trainer.is_global_zero else None
    if state is None:
        return None
    return load_into_base(base_dir, dtype, state, frozen)
