"""``python -m spear.train``: continual pretraining (CPT) with an optional layer-freeze mask.

``run(cfg) -> dict`` is the library entry (the pipeline and tests call it with a composed
config). It loads the base model, plans and applies the freeze mask (``freeze=``), tokenises
and packs the corpus (``data=``, cached), trains with a Lightning Trainer built from
``trainer=``, and writes into ``cfg.paths.output_dir``:

* ``model/``: the trained model as a complete HF dir (safetensors, tokenizer), written atomically;
* ``train_summary.json``: tokens, speed, memory, parameter counts, frozen layers, config hash;
* ``trainable_parameters.txt``: one trainable parameter name per line (frozen ones in the summary);
* ``config.yaml``: the resolved config; ``checkpoints/``: Lightning checkpoints (``ckpt_path=`` resumes).

Every user mistake (bad corpus, ranking, freeze keys, missing package) raises ``SpearError``
before anything is written to the run dir.
"""

from __future__ import annotations

import hashlib
import logging
import math
import resource
import sys
import time
from pathlib import Path
from typing import Any

from spear.cli import hydra_entry
from spear.errors import SpearError

log = logging.getLogger("spear.train")

SUMMARY = "train_summary.json"
TRAINABLE_LIST = "trainable_parameters.txt"
CHECKPOINT_DIR = "checkpoints"


# -- config helpers ---------------------------------------------------------------------------
def resolved_yaml(cfg) -> str:
    from omegaconf import OmegaConf

    return OmegaConf.to_yaml(cfg, resolve=True)


def config_hash(cfg) -> str:
    """sha256 of the resolved config YAML."""
    return hashlib.sha256(resolved_yaml(cfg).encode()).hexdigest()


def _optim(cfg) -> dict[str, Any]:
    o = cfg.get("optim") or {}
    try:
        opts = {
            "lr": float(o.get("lr", 1e-4)),
            "weight_decay": float(o.get("weight_decay", 0.0)),
            "betas": tuple(float(b) for b in o.get("betas", (0.9, 0.95))),
            "eps": float(o.get("eps", 1e-8)),
            "warmup_steps": int(o.get("warmup_steps", 0)),
            "min_lr_ratio": float(o.get("min_lr_ratio", 0.1)),
        }
    except (TypeError, ValueError) as err:
        raise SpearError(f"optim.* holds a non-numeric value ({err}); fix the optim keys") from None
    if opts["lr"] <= 0:
        raise SpearError(f"optim.lr={opts['lr']} must be > 0")
    if len(opts["betas"]) != 2 or not all(0 <= b < 1 for b in opts["betas"]):
        raise SpearError(f"optim.betas={list(opts['betas'])} must be two numbers in [0, 1)")
    if opts["warmup_steps"] < 0 or not 0 <= opts["min_lr_ratio"] <= 1:
        raise SpearError("optim.warmup_steps must be >= 0 and optim.min_lr_ratio in [0, 1]")
    return opts


def total_steps(trainer_cfg, batches_per_epoch: int) -> int:
    """Optimizer steps of the run: ``max_steps`` when set, else epochs x steps per epoch."""
    max_steps = trainer_cfg.get("max_steps", -1)
    if max_steps is not None and int(max_steps) > 0:
        return int(max_steps)
    epochs = trainer_cfg.get("max_epochs")
    if epochs is None or int(epochs) <= 0:
        raise SpearError("set trainer.max_steps (or a positive trainer.max_epochs): the LR schedule needs a finite run")
    accumulate = int(trainer_cfg.get("accumulate_grad_batches", 1) or 1)
    return int(epochs) * math.ceil(batches_per_epoch / accumulate)


def resolve_ckpt_path(ckpt_path) -> str | None:
    """A checkpoint file/dir, or a run dir / checkpoints dir holding ``last.ckpt``; ``last`` as Lightning's."""
    if ckpt_path in (None, "", "null"):
        return None
    if str(ckpt_path) in ("last", "hpc", "registry"):
        return str(ckpt_path)
    path = Path(str(ckpt_path)).expanduser()
    for candidate in (path, path / CHECKPOINT_DIR / "last.ckpt", path / "last.ckpt"):
        if candidate.is_file() or (candidate.is_dir() and (candidate / "latest").exists()):
            return str(candidate)
    raise SpearError(f"ckpt_path={ckpt_path} is not a checkpoint (nor a run dir with {CHECKPOINT_DIR}/last.ckpt); fix ckpt_path")


# -- Lightning pieces ---------------------------------------------------------------------------
def build_logger(cfg, out_dir: Path):
    """Lightning logger for ``cfg.logger`` (W&B offline by default, CSV, or none -> False)."""
    logger_cfg = cfg.get("logger") or {"name": "none"}
    kind = logger_cfg.get("name", "none")
    if kind in ("none", None, False):
        return False
    save_dir = str(logger_cfg.get("save_dir") or out_dir)
    if kind == "csv":
        from pytorch_lightning.loggers import CSVLogger

        return CSVLogger(save_dir=save_dir, name="csv", version="")
    if kind == "wandb":
        from pytorch_lightning.loggers import WandbLogger

        mode = str(logger_cfg.get("mode", "offline"))
        freeze_mode = (cfg.get("freeze") or {}).get("mode", "none")
        return WandbLogger(
            name=cfg.get("run_name") or f"{cfg.get('task_name', 'train')}-{freeze_mode}",
            project=logger_cfg.get("project", "spear-mm"),
            save_dir=save_dir,
            offline=mode == "offline",
            mode=mode,
            tags=list(logger_cfg.get("tags") or []),
            job_type=str(cfg.get("task_name", "train")),
        )
    raise SpearError(f"logger.name={kind!r} is unknown; use wandb, csv or none")


def _speed_callback(world_size_fn):
    import pytorch_lightning as pl

    class SpeedMonitor(pl.Callback):
        """Training tokens and time spent in training steps (excludes validation and checkpoints)."""

        def __init__(self) -> None:
            self.tokens = 0
            self.seconds = 0.0
            self._start: float | None = None

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
            self._start = time.perf_counter()

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
            if self._start is None:
                return
            self.seconds += time.perf_counter() - self._start
            self.tokens += int(batch["input_ids"].numel()) * world_size_fn()
            self._start = None
            if self.seconds > 0:
                pl_module.log("train/tokens_per_s", self.tokens / self.seconds, on_step=True)

    return SpeedMonitor()


def _finish_logger(logger) -> None:
    """Close a W&B run, so that later stages in the same process start their own."""
    from pytorch_lightning.loggers import WandbLogger

    if isinstance(logger, WandbLogger) and logger._experiment is not None:
        logger.experiment.finish()


def _peak_memory() -> dict[str, int | None]:
    import torch

    usage = resource.getrusage(resource.RUSAGE_SELF)
    rss = usage.ru_maxrss if sys.platform == "darwin" else usage.ru_maxrss * 1024
    cuda = int(torch.cuda.max_memory_allocated()) if torch.cuda.is_available() and torch.cuda.is_initialized() else None
    # process CPU time next to wall time shows contention on a shared machine (cpu/wall << threads)
    return {"peak_rss_bytes": int(rss), "peak_cuda_bytes": cuda,
            "cpu_seconds": round(usage.ru_utime + usage.ru_stime, 1), "torch_threads": torch.get_num_threads()}


# -- the stage ------------------------------------------------------------------------------------
def run(cfg) -> dict[str, Any]:
    """Continual pretraining as configured; returns the summary (``model_dir``: the HF dir)."""
    t_start = time.perf_counter()
    import pytorch_lightning as pl
    import torch
    from omegaconf import OmegaConf
    from pytorch_lightning.callbacks import ModelCheckpoint

    from spear import __version__
    from spear.cpt.export import gather_trained_model, save_hf_dir
    from spear.cpt.freeze import apply_freeze, plan_for_model, ranking_for
    from spear.cpt.module import CPTModule
    from spear.cpt.strategies import build_trainer, trainer_kwargs
    from spear.data.datamodule import SpearDataModule
    from spear.io.atomic import write_json_atomic, write_text_atomic
    from spear.models import layer_map_for, load_from_cfg, resolve_model_dir
    from spear.models.loading import torch_dtype

    out_dir = Path(cfg.paths.output_dir)
    overwrite = bool(cfg.get("overwrite", False))
    model_out = out_dir / "model"
    if model_out.exists() and not overwrite:
        raise SpearError(f"{model_out} already exists; set overwrite=true to replace it, or choose another run dir")
    optim = _optim(cfg)
    ckpt_path = resolve_ckpt_path(cfg.get("ckpt_path"))
    trainer_kwargs(cfg.trainer)  # validate the strategy (e.g. DeepSpeed installed) before heavy work
    seed = int(cfg.get("seed", 0))
    pl.seed_everything(seed, workers=True)

    # model + freeze mask
    base_dir = resolve_model_dir(cfg.model.ref, allow_pickle=cfg.model.get("allow_pickle", False),
                                 allow_network=cfg.model.get("allow_network", False))
    model, tokenizer = load_from_cfg(cfg.model)
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
    datamodule = SpearDataModule(cfg.data, tokenizer, seed=seed)
    data_info = datamodule.describe()
    steps = total_steps(cfg.trainer, len(datamodule.train_sampler()))
    log.info("data: %d tokens, %d train / %d val blocks of %d; %d steps of %d tokens",
             data_info["num_tokens"], data_info["train_blocks"], data_info["val_blocks"],
             data_info["block_size"], steps, datamodule.tokens_per_batch)

    module = CPTModule(
        model,
        lr=optim["lr"], weight_decay=optim["weight_decay"], betas=optim["betas"], eps=optim["eps"],
        warmup_steps=optim["warmup_steps"], total_steps=steps, min_lr_ratio=optim["min_lr_ratio"],
        gradient_checkpointing=bool(cfg.get("gradient_checkpointing", False)),
    )

    # everything validated: from here on the run dir gets outputs
    ck = cfg.get("checkpoint") or {}
    ckpt_dir = out_dir / CHECKPOINT_DIR
    callbacks: list = []
    enable_ckpt = bool(ck.get("enabled", True))
    if enable_ckpt:
        callbacks.append(ModelCheckpoint(
            dirpath=str(ckpt_dir), filename="step-{step:06d}", auto_insert_metric_name=False,
            every_n_train_steps=int(ck.get("every_n_steps", 100)), save_top_k=int(ck.get("keep", 1)),
            monitor=None, save_last=ck.get("save_last", "link"), save_on_train_epoch_end=False,
        ))
    holder: dict[str, Any] = {}
    speed = _speed_callback(lambda: int(holder["trainer"].world_size))
    callbacks.append(speed)
    overrides: dict[str, Any] = {
        "default_root_dir": str(out_dir), "logger": build_logger(cfg, out_dir), "callbacks": callbacks,
        "enable_checkpointing": enable_ckpt, "use_distributed_sampler": False,
    }
    if data_info["val_blocks"] == 0:
        overrides["limit_val_batches"] = 0
    trainer = build_trainer(cfg.trainer, **overrides)
    holder["trainer"] = trainer

    if trainer.is_global_zero:
        out_dir.mkdir(parents=True, exist_ok=True)
        write_text_atomic(out_dir / "config.yaml", resolved_yaml(cfg))
        write_text_atomic(out_dir / TRAINABLE_LIST, "".join(f"{n}\n" for n in plan.trainable_params))
    if trainer.logger:
        trainer.logger.log_hyperparams(OmegaConf.to_container(cfg, resolve=True))

    t_fit = time.perf_counter()
    trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_path)
    fit_s = time.perf_counter() - t_fit

    trained = gather_trained_model(
        trainer, module, base_dir=base_dir, dtype=torch_dtype(cfg.model.get("dtype", "float32")),
        frozen=plan.frozen_params, ckpt_dir=ckpt_dir,
    )
    if not trainer.is_global_zero:
        trainer.strategy.barrier("spear-export-done")
        return {}
    save_hf_dir(trained, tokenizer, model_out, overwrite=overwrite)

    metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if torch.is_tensor(v) and v.numel() == 1}
    world = int(trainer.world_size)
    summary = {
        "spear_version": __version__,
        "model_dir": str(model_out),
        "base_model": str(base_dir),
        "steps": int(trainer.global_step),
        "tokens_seen": int(module.tokens_seen) * world,
        "tokens_this_run": int(speed.tokens),
        "train_seconds": round(speed.seconds, 3),
        "tokens_per_s": round(speed.tokens / speed.seconds, 2) if speed.seconds > 0 else None,
        "fit_seconds": round(fit_s, 3),
        "wall_seconds": round(time.perf_counter() - t_start, 3),
        **_peak_memory(),
        "trainable_params": counts["trainable"],
        "frozen_params": counts["frozen"],
        "total_params": counts["total"],
        "num_layers": layer_map.num_layers,
        "frozen_layers": list(plan.frozen_layers),
        "freeze": plan.to_dict(),
        "frozen_parameter_names": list(plan.frozen_params),
        "data": data_info,
        "optim": {**optim, "betas": list(optim["betas"]), "total_steps": steps},
        "trainer": {"strategy": type(trainer.strategy).__name__, "precision": str(trainer.precision),
                    "world_size": world, "accelerator": type(trainer.accelerator).__name__},
        "final_metrics": {k: (v if math.isfinite(v) else None) for k, v in metrics.items()},
        "resumed_from": ckpt_path,
        "checkpoint_dir": str(ckpt_dir) if enable_ckpt else None,
        "config_sha256": config_hash(cfg),
        "seed": seed,
    }
    write_json_atomic(out_dir / SUMMARY, summary)
    _finish_logger(trainer.logger)
    if world > 1:
        trainer.strategy.barrier("spear-export-done")
    log.info("trained %d steps, %d tokens at %s tokens/s; model in %s", summary["steps"], summary["tokens_this_run"],
             summary["tokens_per_s"], model_out)
    return summary


main = hydra_entry("train", run)

if __name__ == "__main__":
    main()
