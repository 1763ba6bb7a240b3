"""Training throughput: spear's Lightning path vs a plain PyTorch loop, MFU against the measured roofline.

Same machine, same run, same model, batches, sequence length, precision (fp32) and optimizer
(AdamW over trainable parameters, warmup + cosine, grad clipping 1.0). Per batch shape
(``--shape``, default the demo's 4x256 and 2x128): the attainable matmul FLOP/s at the model's
GEMM shapes is measured before and after (``roofline.py``); each repeat times enough optimizer
steps to fill ``--window-s`` seconds after ``--warmup`` untimed ones; repeats interleave the paths
(alternating which goes first); min / median / max are reported with the 95% interval of the mean,
which resolves 5% when it is within ±2.5% (the JSON line says when it is not: too noisy to decide).
A one-second GEMM probe before every run reads the machine's speed; ``drift_corrected`` divides each
run's tokens/s by it, which removes the slow drift of a shared VM, and decides ``resolved``.

* throughput: tokens/s of ``spear.train``'s code path (``spear.config.compose("train", ...)`` ->
  SpearDataModule + CPTModule + build_trainer, with its callbacks) vs the plain loop, as the
  median of the per-repeat ratios; target >= 0.95. MFU = tokens/s x (6 N + 12 L H Q T) / the
  attainable FLOP/s (PaLM's model FLOPs; see roofline.py), for both paths.
* freeze (first shape): step time and optimizer-state bytes of ``+experiment=freeze_top8`` (top-8
  layers of the base model's Spectrum SNR ranking; top 2 of a model with fewer than 8 layers) vs
  full CPT, both through spear; target: optimizer state strictly smaller, step time <= 1.05x.
* memory (first shape): a real ``python -m spear.train`` run's account, peak RSS next to its parts.

Uses the embedded SmolLM2-135M when prepared (``--tiny`` forces tiny_llama, e.g. in CI without
assets). The last printed line is the SPEC §2.7 JSON object.
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import math
import os
import shutil
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
from roofline import gemm_probe, machine_load, matmul_roofline, spread, train_flops_per_token  # noqa: E402

from spear.errors import SpearError  # noqa: E402
from spear.models import layer_map_for  # noqa: E402


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def compose(overrides: list[str]):
    """The validated ``train`` run config for ``overrides`` (as ``python -m spear.train`` gets it)."""
    from spear.config import compose as compose_stage

    return compose_stage("train", overrides)


class StepTimer:
    """Timestamps after every optimizer step; the step time over the steps after the warmup."""

    def __init__(self) -> None:
        self.stamps: list[float] = []

    def mark(self) -> None:
        self.stamps.append(time.perf_counter())

    def seconds_per_step(self, warmup: int) -> float:
        """The median step time after the warmup: a step slowed by another process moves it least."""
        t = self.stamps[warmup - 1 :] if warmup > 0 else self.stamps
        return statistics.median(b - a for a, b in zip(t, t[1:], strict=False))


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

    with tempfile.TemporaryDirectory(prefix="bench-train-") as tmp:  # the trainer's root: this run's own
        root = Path(tmp)
        # the callbacks group as spear.train builds it (checkpoint.enabled=false: the SpeedMonitor only)
        callbacks = [*build_callbacks(cfg, root / "checkpoints"), Probe()]
        trainer = build_trainer(cfg.trainer, max_steps=steps + warmup, logger=build_logger(cfg.logger),
                                callbacks=callbacks, enable_checkpointing=False, use_distributed_sampler=False,
                                limit_val_batches=0, enable_progress_bar=False, default_root_dir=str(root))
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


def memory_of_a_run(model_ref: str, data: list[str], batch: int, block: int, steps: int = 2) -> dict:
    """The memory account of a real ``python -m spear.train`` run at this batch (its own process)."""
    import subprocess

    out = Path(tempfile.mkdtemp(prefix="bench-train-memory-"))
    cmd = [sys.executable, "-m", "spear.train", f"model.ref={model_ref}", "logger=none", "checkpoint.enabled=false",
           *data, f"data.batch_size={batch}", f"data.block_size={block}", "data.val_fraction=0",
           f"trainer.max_steps={steps}", "trainer.enable_progress_bar=false", f"hydra.run.dir={out / 'run'}"]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=3600)
    if proc.returncode != 0:
        raise SystemExit(f"bench_train: the memory run failed:\n{proc.stderr[-2000:]}")
    memory = json.loads((out / "run" / "train_summary.json").read_text())["memory"]
    shutil.rmtree(out)  # this benchmark's own temp dir
    return memory


def measure_shape(args, model_ref: str, data: list[str], base, batch: int, block: int, with_freeze: bool) -> dict:
    """Interleaved repeats of both paths (and freeze_top8) at one batch shape, with the roofline around them."""
    common = [f"model.ref={model_ref}", "logger=none", "checkpoint.enabled=false", "paths.output_dir=/tmp/bench-train",
              *data, f"data.batch_size={batch}", f"data.block_size={block}", "data.val_fraction=0"]
    full_cfg = compose(common)
    top8_cfg = compose([*common, "+experiment=freeze_top8"])
    if layer_map_for(base.config).num_layers < 8:
        top8_cfg = compose([*common, "freeze=ranked", "freeze.k=2"])
    tokens = batch * block
    roof_before = matmul_roofline(base.config, tokens)["flops_per_s"]
    probe = plain_run(full_cfg, copy.deepcopy(base), 1, 1)  # one step's seconds: sizes the timed window
    steps = max(args.min_steps, math.ceil(args.window_s / probe))
    runs: dict[str, list[float]] = {"spear": [], "plain": [], "freeze_top8": []}
    probes: dict[str, list[float]] = {"spear": [], "plain": [], "freeze_top8": []}  # the machine's speed at each run
    opt_bytes: dict[str, int] = {}
    for r in range(args.repeats):
        order = ["spear", "plain"] if r % 2 == 0 else ["plain", "spear"]
        for which in order + (["freeze_top8"] if with_freeze else []):
            probes[which].append(gemm_probe(base.config, tokens))
            if which == "plain":
                runs["plain"].append(plain_run(full_cfg, copy.deepcopy(base), steps, args.warmup))
            else:
                sps, opt_bytes[which] = spear_run(top8_cfg if which == "freeze_top8" else full_cfg,
                                                  copy.deepcopy(base), steps, args.warmup)
                runs[which].append(sps)
        log(f"{batch}x{block} repeat {r}: " + ", ".join(f"{k} {tokens / v[-1]:.1f} tok/s" for k, v in runs.items() if v))
    roof = (roof_before + matmul_roofline(base.config, tokens)["flops_per_s"]) / 2
    flops_per_token = train_flops_per_token(base.config, block)
    row = {"batch": f"{batch}x{block}", "tokens_per_step": tokens, "timed_steps": steps,
           "attainable_gflops": round(roof / 1e9, 2), "roofline_drift": round(abs(roof_before - roof) * 2 / roof, 4),
           "train_gflop_per_token": round(flops_per_token / 1e9, 4)}
    for which, seconds in runs.items():
        if not seconds:
            continue
        stats = spread([tokens / s for s in seconds])
        row[which] = {"tokens_per_s": {k: (round(v, 2) if isinstance(v, float) else v) for k, v in stats.items()},
                      "mfu": round(stats["median"] * flops_per_token / roof, 4)}
    paired = spread([p / s for s, p in zip(runs["spear"], runs["plain"], strict=True)])  # spear tok/s / plain tok/s, per repeat
    row["spear_vs_plain"] = {k: (round(v, 4) if isinstance(v, float) else v) for k, v in paired.items()}
    # drift-corrected: each run's tokens/s divided by the machine's speed measured just before it
    reference = statistics.median(v for values in probes.values() for v in values)
    corrected = {which: [tokens / s * reference / p for s, p in zip(runs[which], probes[which], strict=True)]
                 for which in runs if runs[which]}
    row["drift_corrected"] = {which: {k: (round(v, 4) if isinstance(v, float) else v) for k, v in spread(values).items()}
                              for which, values in corrected.items()}
    ratio = spread([a / b for a, b in zip(corrected["spear"], corrected["plain"], strict=True)])
    row["drift_corrected"]["spear_vs_plain"] = {k: (round(v, 4) if isinstance(v, float) else v) for k, v in ratio.items()}
    row["probe_spread"] = round(spread([v for values in probes.values() for v in values])["rel_range"], 4)
    row["resolves_5pct"] = bool(row["drift_corrected"]["spear"]["resolves_5pct"] and row["drift_corrected"]["plain"]["resolves_5pct"])
    if with_freeze:
        row["freeze_top8_step_time"] = round(statistics.median(runs["freeze_top8"]) / statistics.median(runs["spear"]), 4)
        row["freeze_top8_optimizer_state"] = round(opt_bytes["freeze_top8"] / opt_bytes["spear"], 4)
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tiny", action="store_true", help="use tiny_llama even when SmolLM2 is prepared")
    ap.add_argument("--shape", action="append", help="BATCHxBLOCK to measure (repeatable; default: 4x256 and 2x128)")
    ap.add_argument("--window-s", type=float, default=30.0, help="seconds each repeat times (after the warmup)")
    ap.add_argument("--min-steps", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=1, help="untimed steps first")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--no-memory", action="store_true", help="skip the memory account of a real spear.train run")
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
            log("bench_train: SmolLM2 not prepared, using tiny_llama")
    data = ["data.paths=[asset:finance_train]"]
    corpus_dir = None  # this benchmark's own corpus, when the embedded one is not prepared
    try:
        from spear.embedded import asset_path

        asset_path("finance_train")
    except SpearError:
        corpus_dir = Path(tempfile.mkdtemp(prefix="bench-train-corpus-"))
        (corpus_dir / "c.txt").write_text(" ".join(f"account {i} balance credit debit." for i in range(20000)))
        data = [f"data.paths=[{corpus_dir / 'c.txt'}]"]
    shapes = [tuple(int(x) for x in s.lower().split("x")) for s in (args.shape or ["4x256", "2x128"])]
    base, _ = load_model(model_ref)
    load = machine_load()
    try:
        rows = [measure_shape(args, model_ref, data, base, b, s, with_freeze=(i == 0)) for i, (b, s) in enumerate(shapes)]
        memory = None if args.no_memory else memory_of_a_run(model_ref, data, *shapes[0])
    finally:
        if corpus_dir is not None:
            shutil.rmtree(corpus_dir)

    print(f"{'batch':>7} {'path':>12} {'tok/s min/med/max':>22} {'range':>7} {'MFU':>6}")
    for row in rows:
        for which in ("spear", "plain", "freeze_top8"):
            if which in row:
                t = row[which]["tokens_per_s"]
                print(f"{row['batch']:>7} {which:>12} {t['min']:7.1f}/{t['median']:6.1f}/{t['max']:6.1f} "
                      f"{t['rel_range']:7.3f} {row[which]['mfu']:6.3f}")
        print(f"{row['batch']:>7} spear/plain {row['spear_vs_plain']['median']:.3f} "
              f"[{row['spear_vs_plain']['min']:.3f}, {row['spear_vs_plain']['max']:.3f}]; roofline "
              f"{row['attainable_gflops']} GFLOP/s")
        dc = row["drift_corrected"]
        print(f"{row['batch']:>7} drift-corrected: spear 95% ±{dc['spear']['ci95_rel']:.3f}, plain ±{dc['plain']['ci95_rel']:.3f}, "
              f"spear/plain {dc['spear_vs_plain']['median']:.3f} ±{dc['spear_vs_plain']['ci95_rel']:.3f}; "
              f"machine speed spread {row['probe_spread']:.3f}")
    if memory:
        gb = {k: (round(v / 1e9, 3) if isinstance(v, int) else v) for k, v in memory.items()}
        print("memory (GB) of spear.train at " + rows[0]["batch"] + ": " + ", ".join(f"{k.removesuffix('_bytes')} {v}" for k, v in gb.items()))
    first = rows[0]
    ratios = {"throughput": first["spear_vs_plain"]["median"], "freeze_top8_step_time": first["freeze_top8_step_time"],
              "freeze_top8_optimizer_state": first["freeze_top8_optimizer_state"]}
    targets = {"throughput": 0.95, "freeze_top8_step_time": 1.05, "freeze_top8_optimizer_state": 1.0}
    resolved = all(r["resolves_5pct"] for r in rows)
    met = (ratios["throughput"] >= targets["throughput"] and ratios["freeze_top8_step_time"] <= targets["freeze_top8_step_time"]
           and ratios["freeze_top8_optimizer_state"] < targets["freeze_top8_optimizer_state"])
    print(json.dumps({"bench": "train", "baseline": "plain PyTorch loop, same batches and optimizer", "model": model_ref,
                      "rows": rows, "memory": memory, "ratios": ratios, "targets": targets, "met": bool(met),
                      "resolved": resolved, "note": None if resolved else "repeats spread more than 5%: too noisy to decide",
                      "threads": torch.get_num_threads(), "load_before": load, "load_after": machine_load()}))


if __name__ == "__main__":
    main()
