"""The CPT recipes searched for the finance-news default (issue 22), as `spear.train` overrides.

Each recipe trains SmolLM2-135M on the news train split (`data=finance_default`) within the demo's
budget (at most one epoch, ~170k tokens; the demo's CPT should stay near 12 min on 2 CPU cores). Selection never reads the held-out
split: `search.py` scores every recipe on the validation articles and on the calibration-only GSM8K
chat records.
"""

from __future__ import annotations

COMMON = ["data=finance_default", "logger=none", "checkpoint.enabled=false", "trainer.enable_progress_bar=false"]

RECIPES: dict[str, list[str]] = {
    # the old default: 1k-token steps at lr 5e-4 (90 steps, cosine to 0.1 lr)
    "old_default": [],
    # the probe: 4 micro-batches a step (4k tokens), lr 3e-4, warmup 3, decay to 0, one epoch
    "acc4_lr3e-4": ["trainer.accumulate_grad_batches=4", "trainer.max_steps=42", "optim.lr=3e-4",
                    "optim.warmup_steps=3", "optim.min_lr_ratio=0.0"],
    # half the peak lr
    "acc4_lr1.5e-4": ["trainer.accumulate_grad_batches=4", "trainer.max_steps=42", "optim.lr=1.5e-4",
                      "optim.warmup_steps=3", "optim.min_lr_ratio=0.0"],
    # inside the demo's budget (bench_train: ~170 tokens/s at 4 x 256 on 2 cores): 30 steps, 123k tokens, ~12 min
    "acc4_lr2e-4_30": ["trainer.accumulate_grad_batches=4", "trainer.max_steps=30", "optim.lr=2e-4",
                       "optim.warmup_steps=3", "optim.min_lr_ratio=0.0"],
    "acc4_lr3e-4_30": ["trainer.accumulate_grad_batches=4", "trainer.max_steps=30", "optim.lr=3e-4",
                       "optim.warmup_steps=3", "optim.min_lr_ratio=0.0"],
    # twice the batch (8k tokens a step), same lr, half the steps
    "acc8_lr3e-4": ["trainer.accumulate_grad_batches=8", "trainer.max_steps=21", "optim.lr=3e-4",
                    "optim.warmup_steps=2", "optim.min_lr_ratio=0.0"],
}
