"""Training throughput: spear's Lightning path vs a plain PyTorch loop, MFU against the measured roofline.

Same machine, same run, same model, batches, sequence length, precision (fp32) and optimizer
(AdamW over trainable parameters, warmup + cosine, grad clipping 1.0). Per batch shape
(``--shape``, default the demo's 4x256 and 2x128): the attainable matmul FLOP/s at the model's
GEMM shapes is measured before and after (``roofline.py``). The two paths are **paired step by
step**: one Lightning fit of spear's path runs a plain-loop step (on its own model copy) after each
of its steps, from a callback, so every pair meets the same machine. On this project's 2-core VM
the speed moves by 20-30% between 30-second windows (neighbours on shared cores: the repeats of
separate timed windows never agreed within 5%, with or without a GEMM probe to divide by), but
much less within one pair. Per pair, plain seconds / spear seconds is spear's tokens/s over the
plain loop's. After ``--warmup`` untimed pairs and a pilot of ``--pilot-pairs``, pairs go on until
their spread says the interval is narrow enough (``roofline.enough_pairs``, within ``--max-s``); their
median, range and 95% interval of the mean are reported: a ratio resolves 5% when that interval is
within ±2.5% (the JSON line says when it is not).

* throughput: tokens/s of ``spear.train``'s code path (``spear.config.compose("train", ...)`` ->
  SpearDataModule + CPTModule + build_trainer, with its callbacks) vs the plain loop, as the
  median of the per-pair ratios; target >= 0.95. MFU = tokens/s x (6 N + 12 L H Q T) / the
  attainable FLOP/s (PaLM's model FLOPs; see roofline.py), for both paths.
* freeze (first shape): step time and optimizer-state bytes of ``+experiment=freeze_top8`` (top-8
  layers of the base model's Spectrum SNR ranking; top 2 of a model with fewer than 8 layers) vs
  full CPT, both through spear, each paired with the plain loop (the step-time ratio is the ratio of
  the two paired medians); target: optimizer state strictly smaller, step time <= 1.05x.
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
from roofline import enough_pairs, machine_load, matmul_roofline, pairs_needed, spread, train_flops_per_token  # noqa: E402

from spear.errors import SpearError  # noqa: E402
from spear.models import layer_map_for  # noqa: E402

FREEZE_STEP_TIME = 1.05  # target: freeze_top8's step time at most this x full CPT's


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def compose(overrides: list[str]):
    """The validated ``train`` run config for ``overrides`` (as ``python -m spear.train`` gets it)."""
    from spear.config import compose as compose_stage

    return compose_stage("train", overrides)


class PlainLoop:
    """The baseline: a hand-written loop over the same batches with the same optimizer, schedule and
    clipping, advanced one timed step at a time so that it can run between spear's steps."""

    def __init__(self, cfg, model, total_steps: int) -> None:
        from spear.cpt.module import build_optimizer, warmup_cosine
        from spear.data.datamodule import SpearDataModule
        from spear.models import resolve_model_dir
        from spear.models.loading import load_tokenizer

        self.dm = SpearDataModule(cfg.data, load_tokenizer(resolve_model_dir(cfg.model.ref)), seed=cfg.seed)
        o = cfg.optim
        self.model, self.clip = model.train(), cfg.trainer["gradient_clip_val"]
        self.opt = build_optimizer(model, lr=o.lr, weight_decay=o.weight_decay, betas=o.betas, eps=o.eps)
        self.sched = torch.optim.lr_scheduler.LambdaLR(self.opt, lambda s: warmup_cosine(
            s, warmup_steps=o.warmup_steps, total_steps=total_steps, min_lr_ratio=o.min_lr_ratio))
        self.batches = iter(())

    def _next_batch(self):
        try:
            return next(self.batches)
        except StopIteration:  # a new epoch over the same data
            self.batches = iter(self.dm.train_dataloader())
            return next(self.batches)

    def step(self) -> float:
        """Seconds of one optimizer step, the batch fetch included (as in Lightning's loop)."""
        from spear.cpt.module import next_token_loss

        start = time.perf_counter()
        loss = next_token_loss(self.model, self._next_batch()["input_ids"])
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.clip)
        self.opt.step()
        self.sched.step()
        self.opt.zero_grad(set_to_none=True)
        return time.perf_counter() - start


def paired_run(cfg, plain_cfg, base, *, warmup: int, pilot: int, cap: int) -> dict:
    """spear's Lightning path (``cfg``) with one plain-loop step (``plain_cfg``, on its own copy of
    ``base``) run after each of its steps, from a callback: ``warmup`` untimed pairs, ``pilot`` timed
    ones, then more until :func:`enough_pairs` (``pilot == cap``: exactly ``pilot``).

    A spear step is timed from the end of the plain step before it to the end of its own batch, so it
    carries all of Lightning's per-step work (batch fetch, hooks, logging, the module's own hooks);
    the plain step right after it meets the same machine. Returns both paths' per-step seconds of the
    timed pairs and the optimizer-state bytes of spear's run."""
    import pytorch_lightning as pl

    from spear.cpt.freeze import apply_freeze, plan_for_model, ranking_for
    from spear.cpt.module import CPTModule
    from spear.cpt.stage import build_callbacks
    from spear.cpt.strategies import build_trainer
    from spear.data.datamodule import SpearDataModule
    from spear.models import layer_map_for, resolve_model_dir
    from spear.models.loading import load_tokenizer
    from spear.tracking import build_logger

    model = copy.deepcopy(base)
    base_dir = resolve_model_dir(cfg.model.ref)
    lmap = layer_map_for(model.config)
    ranking, source = ranking_for(cfg.freeze, base_dir, lmap.num_layers)
    apply_freeze(model, plan_for_model(cfg.freeze, model, lmap, ranking, source))
    dm = SpearDataModule(cfg.data, load_tokenizer(base_dir), seed=cfg.seed)
    steps = 1 + warmup + cap  # the first spear step is never paired
    module = CPTModule(model, optim=cfg.optim, total_steps=steps, gradient_checkpointing=False)
    plain = PlainLoop(plain_cfg, copy.deepcopy(base), steps)
    pairs: dict[str, list[float]] = {"spear": [], "plain": []}
    opt_bytes: dict[str, int] = {}

    class Interleave(pl.Callback):
        resumed: float | None = None

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            end = time.perf_counter()
            if not opt_bytes:
                opt_bytes["bytes"] = sum(t.numel() * t.element_size() for s in trainer.optimizers[0].state.values()
                                         for t in s.values() if torch.is_tensor(t))
            plain_seconds = plain.step()
            if self.resumed is not None:  # the first step has no plain step before it to time from
                pairs["spear"].append(end - self.resumed)
                pairs["plain"].append(plain_seconds)
                ratios = [p / s for s, p in zip(pairs["spear"][warmup:], pairs["plain"][warmup:], strict=True)]
                if len(ratios) == pilot:
                    log(f"  pilot of {pilot} pairs: about {pairs_needed(ratios, pilot, cap)} pairs in all")
                if enough_pairs(ratios, pilot, cap):
                    log(f"  {len(ratios)} pairs")
                    trainer.should_stop = True
            self.resumed = time.perf_counter()

    with tempfile.TemporaryDirectory(prefix="bench-train-") as tmp:  # the trainer's root: this run's own
        root = Path(tmp)
        # the callbacks group as spear.train builds it (checkpoint.enabled=false: the SpeedMonitor only)
        callbacks = [*build_callbacks(cfg, root / "checkpoints"), Interleave()]
        trainer = build_trainer(cfg.trainer, max_steps=steps, logger=build_logger(cfg.logger),
                                callbacks=callbacks, enable_checkpointing=False, use_distributed_sampler=False,
                                limit_val_batches=0, enable_progress_bar=False, default_root_dir=str(root))
        trainer.fit(module, datamodule=dm)
    return {**{path: seconds[warmup:] for path, seconds in pairs.items()}, "optimizer_bytes": opt_bytes["bytes"]}


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


def per_step_stats(tokens: int, seconds: list[float], flops_per_token: float, roof: float) -> dict:
    stats = spread([tokens / s for s in seconds])  # per step: the paired ratios below keep their values
    return {"tokens_per_s": {k: (round(v, 2) if isinstance(v, float) else v) for k, v in stats.items() if k != "values"},
            "mfu": round(stats["median"] * flops_per_token / roof, 4)}


def ratio_stats(numerators: list[float], denominators: list[float]) -> dict:
    return {k: (round(v, 4) if isinstance(v, float) else v)
            for k, v in spread([a / b for a, b in zip(numerators, denominators, strict=True)]).items()}


def measure_shape(args, model_ref: str, data: list[str], base, batch: int, block: int, with_freeze: bool) -> dict:
    """Paired runs at one batch shape: spear vs plain (and freeze_top8 vs plain), the roofline around them."""
    common = [f"model.ref={model_ref}", "logger=none", "checkpoint.enabled=false", "paths.output_dir=/tmp/bench-train",
              *data, f"data.batch_size={batch}", f"data.block_size={block}", "data.val_fraction=0"]
    full_cfg = compose(common)
    top8_cfg = compose([*common, "+experiment=freeze_top8"])
    if layer_map_for(base.config).num_layers < 8:
        top8_cfg = compose([*common, "freeze=ranked", "freeze.k=2"])
    tokens = batch * block
    roof_before = matmul_roofline(base.config, tokens)["flops_per_s"]
    sizing = PlainLoop(full_cfg, copy.deepcopy(base), 2)
    sizing.step()
    step_seconds = sizing.step()  # one warm step: sizes the run
    del sizing
    cap = max(args.pilot_pairs, int(args.max_s / (2 * step_seconds)))  # the pairs --max-s allows
    runs = {"spear": paired_run(full_cfg, full_cfg, base, warmup=args.warmup, pilot=args.pilot_pairs, cap=cap)}
    log(f"{batch}x{block}: {len(runs['spear']['spear'])} pairs, spear/plain median "
        f"{statistics.median(p / s for s, p in zip(runs['spear']['spear'], runs['spear']['plain'], strict=True)):.3f}")
    if with_freeze:
        runs["freeze_top8"] = paired_run(top8_cfg, full_cfg, base, warmup=args.warmup, pilot=args.freeze_pairs,
                                         cap=args.freeze_pairs)
    roof_after = matmul_roofline(base.config, tokens)["flops_per_s"]
    roof = max(roof_before, roof_after)  # attainable: the faster reading (the mean put the MFU above 1 in a slow spell)
    flops_per_token = train_flops_per_token(base.config, block)
    row = {"batch": f"{batch}x{block}", "tokens_per_step": tokens, "pairs": len(runs["spear"]["spear"]),
           "attainable_gflops": round(roof / 1e9, 2), "roofline_drift": round(abs(roof_before - roof_after) / roof, 4),
           "train_gflop_per_token": round(flops_per_token / 1e9, 4)}
    row["spear"] = per_step_stats(tokens, runs["spear"]["spear"], flops_per_token, roof)
    row["plain"] = per_step_stats(tokens, runs["spear"]["plain"], flops_per_token, roof)
    # per pair: plain seconds / spear seconds = spear's tokens/s over plain's, on the same machine state
    row["spear_vs_plain"] = ratio_stats(runs["spear"]["plain"], runs["spear"]["spear"])
    if with_freeze:
        row["freeze_top8"] = per_step_stats(tokens, runs["freeze_top8"]["spear"], flops_per_token, roof)
        row["freeze_top8_vs_plain"] = ratio_stats(runs["freeze_top8"]["plain"], runs["freeze_top8"]["spear"])
        # both runs are paired against the same plain loop: (spear/plain) / (freeze/plain) = freeze's step time / spear's
        step_time = row["spear_vs_plain"]["median"] / row["freeze_top8_vs_plain"]["median"]
        half = math.hypot(row["spear_vs_plain"]["ci95_rel"], row["freeze_top8_vs_plain"]["ci95_rel"])  # independent runs
        row["freeze_top8_step_time"] = {"ratio": round(step_time, 4), "ci95_rel": round(half, 4),
                                        # a fixed --freeze-pairs run: it decides the target, not a 5% difference
                                        "decides_target": bool(abs(step_time - FREEZE_STEP_TIME) > half * step_time)}
        row["freeze_top8_optimizer_state"] = round(runs["freeze_top8"]["optimizer_bytes"] / runs["spear"]["optimizer_bytes"], 4)
    row["resolves_5pct"] = row["spear_vs_plain"]["resolves_5pct"]
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tiny", action="store_true", help="use tiny_llama even when SmolLM2 is prepared")
    ap.add_argument("--shape", action="append", help="BATCHxBLOCK to measure (repeatable; default: 4x256 and 2x128)")
    ap.add_argument("--pilot-pairs", type=int, default=16, help="timed step pairs before the spread may stop the run")
    ap.add_argument("--max-s", type=float, default=1500.0, help="the most seconds one shape's spear-vs-plain run may time")
    ap.add_argument("--freeze-pairs", type=int, default=12, help="timed step pairs of the freeze_top8 run")
    ap.add_argument("--warmup", type=int, default=1, help="untimed pairs first")
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
        for which in ("spear_vs_plain", "freeze_top8_vs_plain"):
            if which in row:
                r = row[which]
                print(f"{row['batch']:>7} {which}: median {r['median']:.3f} [{r['min']:.3f}, {r['max']:.3f}], "
                      f"95% ±{r['ci95_rel']:.3f} over {r['n']} pairs ({'resolves' if r['resolves_5pct'] else 'does not resolve'} 5%)")
        if "freeze_top8_step_time" in row:
            f = row["freeze_top8_step_time"]
            print(f"{row['batch']:>7} freeze_top8 step time {f['ratio']:.3f}x full CPT ±{f['ci95_rel']:.3f} "
                  f"({'decides' if f['decides_target'] else 'does not decide'} the {FREEZE_STEP_TIME}x target), "
                  f"optimizer state {row['freeze_top8_optimizer_state']:.3f}x")
        print(f"{row['batch']:>7} roofline {row['attainable_gflops']} GFLOP/s (drift {row['roofline_drift']:.3f})")
    if memory:
        gb = {k: (round(v / 1e9, 3) if isinstance(v, int) else v) for k, v in memory.items()}
        print("memory (GB) of spear.train at " + rows[0]["batch"] + ": " + ", ".join(f"{k.removesuffix('_bytes')} {v}" for k, v in gb.items()))
    first = rows[0]
    ratios = {"throughput": first["spear_vs_plain"]["median"], "freeze_top8_step_time": first["freeze_top8_step_time"]["ratio"],
              "freeze_top8_optimizer_state": first["freeze_top8_optimizer_state"]}
    targets = {"throughput": 0.95, "freeze_top8_step_time": FREEZE_STEP_TIME, "freeze_top8_optimizer_state": 1.0}
    resolved = all(r["resolves_5pct"] for r in rows)
    met = (ratios["throughput"] >= targets["throughput"] and ratios["freeze_top8_step_time"] <= targets["freeze_top8_step_time"]
           and ratios["freeze_top8_optimizer_state"] < targets["freeze_top8_optimizer_state"])
    print(json.dumps({"bench": "train", "baseline": "plain PyTorch loop, same batches and optimizer", "model": model_ref,
                      "rows": rows, "memory": memory, "ratios": ratios, "targets": targets, "met": bool(met),
                      "resolved": resolved, "note": None if resolved else "the paired ratios spread more than 5%: too noisy to decide",
                      "threads": torch.get_num_threads(), "load_before": load, "load_after": machine_load()}))


if __name__ == "__main__":
    main()
