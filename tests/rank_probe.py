"""A Lightning callback the DDP tests add from the command line (``+callbacks.probe._target_=rank_probe.RankProbe``):
at the end of training every rank writes what it holds, so a test can check each rank, not only rank 0's export."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytorch_lightning as pl


class RankProbe(pl.Callback):
    """``rank<r>.json`` in the run dir: each frozen parameter's sha256 and the optimizer's state count."""

    def on_train_end(self, trainer, pl_module) -> None:
        optimizer = trainer.optimizers[0]
        params = dict(pl_module.model.named_parameters())
        record = {
            "world_size": trainer.world_size,
            "frozen": {name: hashlib.sha256(p.detach().cpu().numpy().tobytes()).hexdigest()
                       for name, p in params.items() if not p.requires_grad},
            "trainable": sum(p.requires_grad for p in params.values()),
            "optimizer_params": sum(len(group["params"]) for group in optimizer.param_groups),
            "optimizer_states": len(optimizer.state),
        }
        Path(trainer.default_root_dir, f"rank{trainer.global_rank}.json").write_text(json.dumps(record))
