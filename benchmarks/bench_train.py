"""Training throughput: spear's Lightning path vs a plain PyTorch loop; freeze_top8 vs full CPT.

Same machine, same run, same model, batches, sequence length, precision (fp32) and optimizer
(AdamW over trainable parameters, warmup + cosine, grad clipping 1.0). Repeats alternate the
order of the two paths; each repeat times ``--steps`` optimizer steps after ``--warmup`` untimed
ones, and the median over repeats is reported.

* throughput: tokens/s of ``spear.train``'s code path (``spear.config.compose("train", ...)`` ->
  SpearDataModule + CPTModule + build_trainer, with its callbacks) vs the plain loop;
  target ratio >= 0.95.
* freeze: step time and optimizer-state bytes of ``+experiment=freeze_top8`` (top-8 layers of the
  base model's Spectrum SNR ranking; top 2 of a model with fewer than 8 layers) vs full CPT, both
  through spear; target: optimizer state strictly smaller, step time not slower (<= 1.05x).

Uses the embedded SmolLM2-135M when prepared (``--tiny`` forces tiny_llama, e.g. in CI without
assets). The last printed line is the SPEC §2.7 JSON object.
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import os
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from spear.errors import SpearError  # noqa: E402


def compose(overrides: list[str]):
    """The validated ``train`` run config for ``overrides`` (as ``python -m spear.train`` gets it)."""
    from spear.config import compose as compose_stage

    return compose_stage("train", overrides)


class StepTimer:
    """Timestamps after every optimizer step; tokens/s over the steps after the warmup."""

    def __init__(self) -> None:
        self.stamps: list[float] = []

    def mark(self) -> None:
        self.stamps.append(time.perf_counter())

    def seconds_per_step(self, warmup: int) -> float:
        t = self.stamps[warmup - 1 :] if warmup > 0 else self.stamps
        return (t[-1] - t[0]) / (len(t) - 1)


def spear_run(cfg, model, steps: int, warmup: int):
    """One spear run (Lightning Trainer, the same pieces as spear.cpt.stage.run_train); returns (s/step, opt bytes)."""
    import pytorch_lightning as pl

    from spear.cpt.freeze import apply_freeze, plan_for_model, ranking_for
    from spear.cpt.module import CPTModule
    from spear.cpt.stage import build_callbacks
    from spear.cpt.strategies import build_trainer
    from spear.data.datamodule import SpearDataModule
    from spear.models import layer_map_for, resolve_model_dir
    from spear.models.loading import load_tokenizer
    from spear.tracking import build_logger

    base_dir = resolve_model_dir(cfg.model.ref)
    lmap = layer_map_for(model.config)
    ranking, source = ranking_for(cfg.freeze, base_dir, lmap.num_layers)
    apply_freeze(model, plan_for_model(cfg.freeze, model, lmap, ranking, source))
    dm = SpearDataModule(cfg.data, load_tokenizer(base_dir), seed=cfg.seed)
    module = CPTModule(model, optim=cfg.optim, total_steps=steps + warmup, gradient_checkpointing=False)
    timer = StepTimer()
    opt_bytes: dict[str, int] = {}

    class Probe(pl.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            timer.mark()
            if not opt_bytes:
                opt = trainer.optimizers[0]
                opt_bytes["bytes"] = sum(t.numel() * t.element_size() for s in opt.state.values()
                                         for t in s.values() if torch.is_tensor(t))

    root = Path(tempfile.mkdtemp(prefix="bench-train-"))
    # the callbacks group as spear.train builds it (checkpoint.enabled=false: the SpeedMonitor only)
    callbacks = [*build_callbacks(cfg, root / "checkpoints"), Probe()]
    trainer = build_trainer(cfg.trainer, max_steps=steps + warmup, logger=build_logger(cfg.logger), callbacks=callbacks,
                            enable_checkpointing=False, use_distributed_sampler=False, limit_val_batches=0,
                            enable_progress_bar=False, default_root_dir=str(root))
    trainer.fit(module, datamodule=dm)
    return timer.seconds_per_step(warmup), opt_bytes["bytes"]


def plain_run(cfg, model, steps: int, warmup: int) -> float:
    """The baseline: a hand-written loop over the same batches with the same optimizer and schedule."""
    from spear.cpt.module import build_optimizer, next_token_loss, warmup_cosine
    from spear.data.datamodule import SpearDataModule
    from spear.models import resolve_model_dir
    from spear.models.loading import load_tokenizer

    dm = SpearDataModule(cfg.data, load_tokenizer(resolve_model_dir(cfg.model.ref)), seed=cfg.seed)
    o = cfg.optim
    opt = build_optimizer(model, lr=o.lr, weight_decay=o.weight_decay, betas=o.betas, eps=o.eps)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: warmup_cosine(
        s, warmup_steps=o.warmup_steps, total_steps=steps + warmup, min_lr_ratio=o.min_lr_ratio))
    model.train()
    timer = StepTimer()
    done = 0
    while done < steps + warmup:
        for batch in dm.train_dataloader():
            loss = next_token_loss(model, batch["input_ids"])
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.trainer["gradient_clip_val"])
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
            timer.mark()
            done += 1
            if done == steps + warmup:
                break
    return timer.seconds_per_step(warmup)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tiny", action="store_true", help="use tiny_llama even when SmolLM2 is prepared")
    ap.add_argument("--steps", type=int, default=4, help="timed optimizer steps per run")
    ap.add_argument("--warmup", type=int, default=1, help="untimed steps first")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--batch-size", type=int, default=2)
    ap.add_argument("--block-size", type=int, default=128)
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    warnings.filterwarnings("ignore")
    import pytorch_lightning  # noqa: F401  (sets its loggers to INFO on import; quiet them after)

    for name in ("pytorch_lightning", "lightning_fabric", "lightning.pytorch"):
        logging.getLogger(name).setLevel(logging.ERROR)

    from spear.models import load_model, resolve_model_dir

    model_ref = "tiny_llama"
    if not args.tiny:
        try:
            resolve_model_dir("smollm2_135m")
            model_ref = "smollm2_135m"
        except SpearError:
            print("bench_train: SmolLM2 not prepared, using tiny_llama", file=sys.stderr)
    data = ["data.paths=[asset:finance_train]"]
    try:
        from spear.embedded import asset_path

        asset_path("finance_train")
    except SpearError:
        corpus = Path(tempfile.mkdtemp(prefix="bench-train-corpus-")) / "c.txt"
        corpus.write_text(" ".join(f"account {i} balance credit debit." for i in range(20000)))
        data = [f"data.paths=[{corpus}]"]
    common = [f"model.ref={model_ref}", "logger=none", "checkpoint.enabled=false",
              "paths.output_dir=/tmp/bench-train", *data,
              f"data.batch_size={args.batch_size}", f"data.block_size={args.block_size}", "data.val_fraction=0"]
    full_cfg = compose(common)
    top8_cfg = compose([*common, "+experiment=freeze_top8"])
    base, _ = load_model(model_ref)
    from spear.models import layer_map_for

    if layer_map_for(base.config).num_layers < 8:
        top8_cfg = compose([*common, "freeze=ranked", "freeze.k=2"])
    tokens = args.batch_size * args.block_size
    spear_sps, plain_sps, full_sps, top8_sps, full_opt, top8_opt = [], [], [], [], [], []
    for r in range(args.repeats):
        order = ("spear", "plain") if r % 2 == 0 else ("plain", "spear")
        for which in order:
            if which == "spear":
                sps, ob = spear_run(full_cfg, copy.deepcopy(base), args.steps, args.warmup)
                spear_sps.append(sps)
                full_sps.append(sps)
                full_opt.append(ob)
            else:
                plain_sps.append(plain_run(full_cfg, copy.deepcopy(base), args.steps, args.warmup))
        sps, ob = spear_run(top8_cfg, copy.deepcopy(base), args.steps, args.warmup)
        top8_sps.append(sps)
        top8_opt.append(ob)
        print(f"repeat {r}: spear {tokens / spear_sps[-1]:.1f} tok/s, plain {tokens / plain_sps[-1]:.1f} tok/s, "
              f"top8 step {top8_sps[-1]:.3f}s vs full {full_sps[-1]:.3f}s", file=sys.stderr)

    med = statistics.median
    metrics = {
        "model": model_ref,
        "tokens_per_step": tokens,
        "threads": torch.get_num_threads(),
        "spear_tokens_per_s": round(tokens / med(spear_sps), 2),
        "plain_tokens_per_s": round(tokens / med(plain_sps), 2),
        "full_step_s": round(med(full_sps), 4),
        "freeze_top8_step_s": round(med(top8_sps), 4),
        "full_optimizer_state_bytes": int(med(full_opt)),
        "freeze_top8_optimizer_state_bytes": int(med(top8_opt)),
        "freeze_top8_mode": str(top8_cfg.freeze.mode),
        "load_avg_1m": round(os.getloadavg()[0], 2),
    }
    ratios = {
        "throughput": round(metrics["spear_tokens_per_s"] / metrics["plain_tokens_per_s"], 4),
        "freeze_top8_step_time": round(metrics["freeze_top8_step_s"] / metrics["full_step_s"], 4),
        "freeze_top8_optimizer_state": round(top8_opt[0] / full_opt[0], 4),
    }
    targets = {"throughput": 0.95, "freeze_top8_step_time": 1.05, "freeze_top8_optimizer_state": 1.0}
    met = (ratios["throughput"] >= targets["throughput"]
           and ratios["freeze_top8_step_time"] <= targets["freeze_top8_step_time"]
           and ratios["freeze_top8_optimizer_state"] < targets["freeze_top8_optimizer_state"])
    print(json.dumps({"bench": "train", "metrics": metrics, "ratios": ratios, "targets": targets, "met": bool(met)}))


if __name__ == "__main__":
    main()
