"""Trainer construction from the ``trainer`` config group, and lazy strategy factories.

The ``trainer`` group holds ``pytorch_lightning.Trainer`` keyword arguments (plus
``_target_: pytorch_lightning.Trainer``), so ``trainer.max_steps=2`` works and
``hydra.utils.instantiate(cfg.trainer)`` builds a Trainer. Strategies that need optional
packages or model-dependent objects are given as ``_target_`` nodes pointing at the factories
below, which import their dependencies only when called: the configs compose (and are
validated) on a machine without DeepSpeed or a GPU, and building them there gives a one-line
:class:`SpearError` that names the fix.

:func:`build_trainer` is what ``spear.train`` uses: it instantiates the strategy node itself (so
a missing package surfaces as a ``SpearError``, not a wrapped Hydra error), checks that a GPU
exists when the config asks for one, and adds the run's logger and callbacks.
"""

from __future__ import annotations

import functools
import importlib
from collections.abc import Iterable
from typing import Any

from spear.errors import SpearError

DEEPSPEED_HINT = "pip install 'spear-mm[deepspeed]'"
GPU_ACCELERATORS = ("gpu", "cuda")
# Decoder-layer classes end with one of these: the FSDP wrap / activation-checkpointing unit.
DECODER_LAYER_SUFFIXES = ("DecoderLayer",)


def deepspeed_available() -> bool:
    try:
        importlib.import_module("deepspeed")
    except Exception:  # ImportError, or a broken install (CUDA/ops mismatch) raising anything
        return False
    return True


def require_deepspeed() -> None:
    if not deepspeed_available():
        raise SpearError(f"this trainer config uses DeepSpeed, which is not installed; run `{DEEPSPEED_HINT}` or pick trainer=gpu/ddp/fsdp")


def deepspeed(stage: int = 2, **kwargs: Any):
    """``DeepSpeedStrategy(stage=..., **kwargs)``; a ``SpearError`` naming the install when missing."""
    require_deepspeed()
    from pytorch_lightning.strategies import DeepSpeedStrategy

    return DeepSpeedStrategy(stage=int(stage), **kwargs)


def _is_decoder_layer(module, suffixes: tuple[str, ...]) -> bool:
    return type(module).__name__.endswith(suffixes)


def _wrap_decoder_layers(module, recurse: bool, nonwrapped_numel: int, suffixes: tuple[str, ...]) -> bool:
    # FSDP auto-wrap policy signature: recurse into children always; wrap decoder layers.
    return True if recurse else _is_decoder_layer(module, suffixes)


def fsdp(
    sharding_strategy: str = "FULL_SHARD",
    wrap: str = "decoder_layers",
    activation_checkpointing: bool = False,
    layer_class_suffixes: Iterable[str] = DECODER_LAYER_SUFFIXES,
    **kwargs: Any,
):
    """``FSDPStrategy`` that wraps every decoder layer (any ``*DecoderLayer`` class) as one unit.

    ``wrap``: ``decoder_layers`` or ``none`` (one flat unit). ``use_orig_params`` (default true)
    lets a wrapped layer hold frozen and trainable parameters together (partial freeze masks).
    """
    from pytorch_lightning.strategies import FSDPStrategy

    suffixes = tuple(layer_class_suffixes)
    kwargs.setdefault("use_orig_params", True)
    if wrap == "decoder_layers":
        kwargs["auto_wrap_policy"] = functools.partial(_wrap_decoder_layers, suffixes=suffixes)
    elif wrap != "none":
        raise SpearError(f"trainer.strategy.wrap={wrap!r} is unknown; use decoder_layers or none")
    if activation_checkpointing:
        kwargs["activation_checkpointing_policy"] = functools.partial(_wrap_decoder_layers, suffixes=suffixes)
    return FSDPStrategy(sharding_strategy=sharding_strategy, **kwargs)


def _call_target(node: dict[str, Any]):
    node = dict(node)
    target = node.pop("_target_")
    node.pop("_partial_", None)
    module_name, _, attr = target.rpartition(".")
    try:
        fn = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as err:
        raise SpearError(f"trainer.strategy._target_={target!r} cannot be imported ({err}); fix the trainer config") from None
    return fn(**node)


def trainer_kwargs(trainer_cfg) -> dict[str, Any]:
    """Plain Trainer kwargs from the config node, with the strategy built (lazily imported)."""
    from omegaconf import DictConfig, OmegaConf

    kwargs = OmegaConf.to_container(trainer_cfg, resolve=True) if isinstance(trainer_cfg, DictConfig) else dict(trainer_cfg)
    kwargs.pop("_target_", None)
    strategy = kwargs.get("strategy", "auto")
    if isinstance(strategy, dict) and "_target_" in strategy:
        kwargs["strategy"] = _call_target(strategy)
    elif isinstance(strategy, str) and strategy.startswith("deepspeed"):
        require_deepspeed()
    return kwargs


def wants_gpu(kwargs: dict[str, Any]) -> bool:
    return str(kwargs.get("accelerator", "auto")).lower() in GPU_ACCELERATORS


def build_trainer(trainer_cfg, **overrides: Any):
    """``pytorch_lightning.Trainer`` from the ``trainer`` group, ``overrides`` taking precedence."""
    import pytorch_lightning as pl
    from lightning_fabric.utilities.exceptions import MisconfigurationException

    kwargs = trainer_kwargs(trainer_cfg)
    kwargs.update(overrides)
    if wants_gpu(kwargs):
        import torch

        if not torch.cuda.is_available():
            raise SpearError(
                f"trainer.accelerator={kwargs['accelerator']} needs a CUDA GPU and none is visible; "
                "use trainer=cpu (or trainer.accelerator=cpu)"
            )
    try:
        return pl.Trainer(**kwargs)
    except TypeError as err:
        raise SpearError(f"the trainer config has an invalid key ({err}); trainer.* keys are pytorch_lightning.Trainer arguments") from None
    except (ValueError, MisconfigurationException) as err:
        raise SpearError(f"the trainer config is inconsistent: {err}".replace("\n", " ")) from None
