"""The train stage: continual pretraining (CPT) with an optional layer-freeze mask.

Loads the base model, plans and applies the freeze mask (``freeze``), tokenises and packs the
corpus (``data``, cached), trains with the Lightning Trainer of ``trainer`` (logger from ``logger``,
callbacks from ``callbacks``), and writes into the run dir:

* ``model/``: the trained model as a complete HF dir (safetensors, tokenizer), written atomically;
* ``train_summary.json``: tokens, speed, memory (peak RSS next to its parts, :mod:`spear.cpt.memory`),
  parameter counts, frozen layers, config hash;
* ``trainable_parameters.txt``: one trainable parameter name per line (frozen ones in the summary);
* ``config.yaml``: the validated config; ``checkpoints/``: Lightning checkpoints (``ckpt_path=`` resumes).

Every user mistake (bad corpus, ranking, freeze keys, missing package) raises ``SpearError``
before anything is written to the run dir.
"""

from __future__ import annotations

import hashlib
import logging
import math
import resource
import time
import zipfile
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from hydra.utils import instantiate

from spear import __version__
from spear.config import resolved_yaml, save_run_config
from spear.cpt.callbacks import SpeedMonitor
from spear.cpt.export import gather_trained_model, save_hf_dir
from spear.cpt.freeze import apply_freeze, plan_for_model, ranking_for
from spear.cpt.memory import memory_account
from spear.cpt.module import CPTModule
from spear.cpt.strategies import build_trainer, trainer_kwargs
from spear.data.datamodule import SpearDataModule
from spear.errors import SpearError
from spear.io.atomic import check_completed, check_output_free, write_json_atomic, write_text_atomic
from spear.models import layer_map_for, load_model, resolve_model_dir
from spear.models.card import write_train_card
from spear.models.loading import max_positions, torch_dtype
from spear.runtime import peak_rss_bytes, rss_bytes
from spear.tracking import build_logger, finish_logger

log = logging.getLogger(__name__)

SUMMARY = "train_summary.json"
TRAINABLE_LIST = "trainable_parameters.txt"
CHECKPOINT_DIR = "checkpoints"


def total_steps(trainer_cfg: dict[str, Any], batches_per_epoch: int) -> int:
    """Optimizer steps of the run: ``max_steps`` when set, else epochs x steps per epoch."""
    max_steps = trainer_cfg["max_steps"]
    if max_steps is not None and int(max_steps) > 0:
        return int(max_steps)
    epochs = trainer_cfg["max_epochs"]
    if epochs is None or int(epochs) <= 0:
        raise SpearError("set trainer.max_steps (or a positive trainer.max_epochs): the LR schedule needs a finite run")
    accumulate = int(trainer_cfg["accumulate_grad_batches"])
    return int(epochs) * math.ceil(batches_per_epoch / accumulate)


def check_lightning_checkpoint(path: Path) -> None:
    """A resumable checkpoint: loads weights-only (no pickled code runs) and is Lightning's, not a bare state
    dict (``pytorch_model.bin``). Memory-mapped, so a large checkpoint is not read twice."""
    import pickle

    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except (pickle.UnpicklingError, RuntimeError, ValueError):
        raise SpearError(f"ckpt_path={path} does not load weights-only: it holds pickled Python objects, which spear "
                         "never runs; resume from a checkpoint a spear train run wrote") from None
    if not (isinstance(ckpt, dict) and "state_dict" in ckpt and "pytorch-lightning_version" in ckpt):
        raise SpearError(f"ckpt_path={path} is not a Lightning checkpoint (no state_dict/pytorch-lightning_version; "
                         "a bare weights file?); ckpt_path resumes a spear train run: to start from weights, "
                         "convert them to safetensors and set model.ref=<that dir>")


def resolve_ckpt_path(ckpt_path: str | None) -> str | None:
    """A checkpoint file/dir, or a run dir / checkpoints dir holding ``last.ckpt``; ``last`` as Lightning's."""
    if ckpt_path is None:
        return None
    if ckpt_path in ("last", "hpc", "registry"):
        return ckpt_path
    path = Path(ckpt_path).expanduser()
    for candidate in (path, path / CHECKPOINT_DIR / "last.ckpt", path / "last.ckpt"):
        if candidate.is_file():
            if not zipfile.is_zipfile(candidate.resolve()):  # torch.save's format: a truncated file is no zip
                raise SpearError(f"ckpt_path={candidate} is not a readable checkpoint (truncated or not a Lightning "
                                 "checkpoint); point ckpt_path to another one, e.g. an earlier step-*.ckpt")
            check_lightning_checkpoint(candidate)
            return str(candidate)
        if candidate.is_dir() and (candidate / "latest").exists():  # a DeepSpeed checkpoint dir
            return str(candidate)
    raise SpearError(f"ckpt_path={ckpt_path} is not a checkpoint (nor a run dir with {CHECKPOINT_DIR}/last.ckpt); fix ckpt_path")


def build_callbacks(cfg, ckpt_dir: Path) -> list:
    """The ``callbacks`` group instantiated; the checkpoint callback only with ``checkpoint.enabled``,
    writing into ``ckpt_dir`` (the run dir's ``checkpoints/``, where ``ckpt_path=<run dir>`` looks)."""
    out = []
    for name, node in cfg.callbacks.items():
        if name != "model_checkpoint":
            out.append(instantiate(node))
        elif cfg.checkpoint.enabled:
            out.append(instantiate(node, dirpath=str(ckpt_dir)))
    return out


def _resources() -> dict[str, Any]:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    cuda = int(torch.cuda.max_memory_allocated()) if torch.cuda.is_available() and torch.cuda.is_initialized() else None
    # process CPU time next to wall time shows contention on a shared machine (cpu/wall << threads)
    return {"peak_rss_bytes": peak_rss_bytes(), "peak_cuda_bytes": cuda,
            "cpu_seconds": round(usage.ru_utime + usage.ru_stime, 1), "torch_threads": torch.get_num_threads()}


def run_train(cfg) -> dict[str, Any]:
    """Continual pretraining as configured; returns the summary (``model_dir``: the HF dir)."""
    t_start = time.perf_counter()
    out_dir = Path(cfg.paths.output_dir)
    model_out = out_dir / "model"
    check_completed(model_out, out_dir / SUMMARY, cfg.overwrite)
    check_output_free(model_out, cfg.overwrite)
    ckpt_path = resolve_ckpt_path(cfg.ckpt_path)
    trainer_kwargs(cfg.trainer)  # validate the strategy (e.g. DeepSpeed installed) before heavy work
    pl.seed_everything(cfg.seed, workers=True)

    # model + freeze mask
    base_dir = resolve_model_dir(cfg.model.ref, allow_pickle=cfg.model.allow_pickle, allow_network=cfg.model.allow_network)
    model, tokenizer = load_model(cfg.model.ref, **cfg.model.load_options())
    limit = max_positions(model)
    if limit is not None and cfg.data.block_size > limit:
        raise SpearError(f"data.block_size={cfg.data.block_size} is longer than the model's {limit} positions "
                         f"(max_position_embeddings of {cfg.model.ref}); set data.block_size<={limit}")
    layer_map = layer_map_for(model.config)
    ranking, ranking_source = ranking_for(cfg.freeze, base_dir, layer_map.num_layers)
    plan = plan_for_model(cfg.freeze, model, layer_map, ranking, ranking_source)
    counts = apply_freeze(model, plan)
    log.info(
        "freeze=%s: %d/%d layers frozen %s, %d trainable / %d frozen parameters (%.1f%% trainable)",
        plan.mode, len(plan.frozen_layers), layer_map.num_layers, list(plan.frozen_layers),
        counts["trainable"], counts["frozen"], 100.0 * counts["trainable"] / max(1, counts["total"]),
    )
    for note in plan.notes:
        log.info("freeze: %s", note)
    if counts["trainable"] == 0:
        raise SpearError("the freeze mask leaves no trainable parameter; lower freeze.k or change freeze.modules/embeddings")

    # data
    datamodule = SpearDataModule(cfg.data, tokenizer, seed=cfg.seed)
    data_info = datamodule.describe()
    steps = total_steps(cfg.trainer, len(datamodule.train_sampler()))
    accumulate = int(cfg.trainer.get("accumulate_grad_batches") or 1)
    log.info("data: %d tokens, %d train / %d val blocks of %d; %d steps of %d tokens (%.2f epochs)",
             data_info["num_tokens"], data_info["train_blocks"], data_info["val_blocks"], data_info["block_size"], steps,
             datamodule.tokens_per_batch * accumulate,
             steps * accumulate * datamodule.tokens_per_batch / max(1, data_info["train_blocks"] * data_info["block_size"]))
    module = CPTModule(model, optim=cfg.optim, total_steps=steps, gradient_checkpointing=cfg.gradient_checkpointing)

    # everything validated: from here on the run dir gets outputs
    ckpt_dir = out_dir / CHECKPOINT_DIR
    callbacks = build_callbacks(cfg, ckpt_dir)
    speed = next((c for c in callbacks if isinstance(c, SpeedMonitor)), None)
    overrides: dict[str, Any] = {
        "default_root_dir": str(out_dir), "logger": build_logger(cfg.logger), "callbacks": callbacks,
        "enable_checkpointing": cfg.checkpoint.enabled, "use_distributed_sampler": False,
    }
    if data_info["val_blocks"] == 0:
        overrides["limit_val_batches"] = 0
    trainer = build_trainer(cfg.trainer, **overrides)

    config_yaml = resolved_yaml(cfg)
    if trainer.is_global_zero:
        out_dir.mkdir(parents=True, exist_ok=True)
        save_run_config(cfg, out_dir)
        write_text_atomic(out_dir / TRAINABLE_LIST, "".join(f"{n}\n" for n in plan.trainable_params))
    if trainer.logger:
        trainer.logger.log_hyperparams(cfg.model_dump(mode="json"))

    rss_at_start = rss_bytes()
    t_fit = time.perf_counter()
    trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_path)
    fit_s = time.perf_counter() - t_fit
    memory = memory_account(module.model, trainer.optimizers[0] if trainer.optimizers else None,
                            rss_at_start=rss_at_start, activation_bytes=module.activation_bytes,
                            peak_rss=peak_rss_bytes())

    trained = gather_trained_model(trainer, module, base_dir=base_dir, dtype=torch_dtype(cfg.model.dtype),
                                   frozen=plan.frozen_params, ckpt_dir=ckpt_dir)
    if not trainer.is_global_zero:
        trainer.strategy.barrier("spear-export-done")
        return {}
    save_hf_dir(trained, tokenizer, model_out, overwrite=cfg.overwrite)

    metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if torch.is_tensor(v) and v.numel() == 1}
    world = int(trainer.world_size)
    tokens, seconds = (speed.tokens, speed.seconds) if speed is not None else (0, 0.0)
    summary = {
        "spear_version": __version__,
        "model_dir": str(model_out),
        "base_model": str(base_dir),
        "steps": int(trainer.global_step),
        "tokens_seen": int(module.tokens_seen) * world,
        "tokens_this_run": int(tokens),
        "train_seconds": round(seconds, 3),
        "tokens_per_s": round(tokens / seconds, 2) if seconds > 0 else None,
        "fit_seconds": round(fit_s, 3),
        "wall_seconds": round(time.perf_counter() - t_start, 3),
        **_resources(),
        "memory": memory,
        "trainable_params": counts["trainable"],
        "frozen_params": counts["frozen"],
        "total_params": counts["total"],
        "num_layers": layer_map.num_layers,
        "frozen_layers": list(plan.frozen_layers),
        "freeze": plan.to_dict(),
        "frozen_parameter_names": list(plan.frozen_params),
        "data": data_info,
        "optim": {**cfg.optim.model_dump(mode="json"), "total_steps": steps},
        "trainer": {"strategy": type(trainer.strategy).__name__, "precision": str(trainer.precision),
                    "world_size": world, "accelerator": type(trainer.accelerator).__name__},
        "final_metrics": {k: (v if math.isfinite(v) else None) for k, v in metrics.items()},
        "resumed_from": ckpt_path,
        "checkpoint_dir": str(ckpt_dir) if cfg.checkpoint.enabled else None,
        "config_sha256": hashlib.sha256(config_yaml.encode()).hexdigest(),
        "seed": cfg.seed,
    }
    write_train_card(model_out, summary, base_dir, config_yaml)
    write_json_atomic(out_dir / SUMMARY, summary)  # the completion marker: last
    finish_logger(trainer.logger)
    if world > 1:
        trainer.strategy.barrier("spear-export-done")
    log.info("trained %d steps, %d tokens at %s tokens/s; model in %s", summary["steps"], summary["tokens_this_run"],
             summary["tokens_per_s"], model_out)
    return summary
