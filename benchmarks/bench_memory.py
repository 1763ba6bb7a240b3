"""Where a CPT step's unexplained memory goes: the vocabulary's logits, measured apart.

``train_summary.json`` accounts a CPT's peak RSS as weights + gradients + optimizer state + the
activations autograd saves, and leaves a remainder (0.68 GB on SmolLM2 at 4 x 256). One suspect is
the output layer's transient buffers, which no saved-tensor count sees: the float32 logits of a batch
(tokens x vocabulary x 4 bytes, 0.2 GB here), their log-softmax and the gradients of both exist
together during the backward pass. This benchmark measures that share apart: it runs the same
optimizer steps in fresh processes twice and compares their peak RSS (VmHWM):

* baseline: spear's CPT loss (``spear.cpt.module.next_token_loss``, the model's own loss on full logits);
* chunked: the same loss computed ``--chunk`` positions at a time, each chunk's logits recomputed in
  the backward pass (``torch.utils.checkpoint``), so one chunk's logits are alive at a time.

The difference is the memory the full logits cost; the losses agree to float32 rounding. The last
printed line is the SPEC §2.7 JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def chunked_loss(model, input_ids, chunk: int):
    """Mean next-token NLL with the vocabulary projection done ``chunk`` positions at a time."""
    import torch
    from torch.utils.checkpoint import checkpoint

    hidden = model.base_model(input_ids=input_ids, use_cache=False).last_hidden_state[:, :-1]
    labels = input_ids[:, 1:]

    def piece(h, y):
        logits = model.lm_head(h).float()
        return torch.nn.functional.cross_entropy(logits.flatten(0, 1), y.flatten(), reduction="sum")

    total = sum(checkpoint(piece, hidden[:, i:i + chunk], labels[:, i:i + chunk], use_reentrant=False)
                for i in range(0, labels.shape[1], chunk))
    return total / labels.numel()


def child(args) -> None:
    """A few AdamW steps of the embedded model on random tokens; prints its losses and peak RSS."""
    import torch

    from spear.cpt.module import next_token_loss
    from spear.models import load_model
    from spear.runtime import peak_rss_bytes

    torch.manual_seed(0)
    model, _ = load_model(args.model)
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5)
    ids = torch.randint(0, model.config.vocab_size, (args.batch, args.block))
    losses, start = [], time.perf_counter()
    for _ in range(args.steps):
        loss = next_token_loss(model, ids) if args.child == "full" else chunked_loss(model, ids, args.chunk)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(float(loss))
    print(json.dumps({"losses": losses, "peak_rss": peak_rss_bytes(), "seconds": time.perf_counter() - start,
                      "logits_bytes": args.batch * args.block * model.config.vocab_size * 4}))


def run_child(args, which: str) -> dict:
    cmd = [sys.executable, __file__, "--child", which, "--model", args.model, "--batch", str(args.batch),
           "--block", str(args.block), "--steps", str(args.steps), "--chunk", str(args.chunk)]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=3600)
    if proc.returncode != 0:
        raise SystemExit(f"bench_memory: the {which} run failed:\n{proc.stderr[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="smollm2_135m", help="model ref (tiny_llama for a quick check)")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--block", type=int, default=256)
    ap.add_argument("--steps", type=int, default=2, help="optimizer steps (the second holds AdamW's state)")
    ap.add_argument("--chunk", type=int, default=64, help="positions per chunk of the chunked loss")
    ap.add_argument("--child", choices=("full", "chunked"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(args)
        return
    full, chunked = run_child(args, "full"), run_child(args, "chunked")
    saved = full["peak_rss"] - chunked["peak_rss"]
    loss_gap = max(abs(a - b) for a, b in zip(full["losses"], chunked["losses"], strict=True))
    print(f"peak RSS at {args.batch}x{args.block}: full logits {full['peak_rss'] / 1e9:.3f} GB, chunked "
          f"({args.chunk} positions) {chunked['peak_rss'] / 1e9:.3f} GB; the full logits cost {saved / 1e9:.3f} GB "
          f"= {saved / full['logits_bytes']:.2f}x one float32 logits tensor ({full['logits_bytes'] / 1e9:.3f} GB); "
          f"step time {chunked['seconds'] / full['seconds']:.2f}x; largest loss difference {loss_gap:.2e}")
    print(json.dumps({"bench": "memory", "baseline": "spear's CPT loss on full logits", "model": args.model,
                      "batch": f"{args.batch}x{args.block}", "chunk": args.chunk,
                      "peak_rss_bytes": {"full": full["peak_rss"], "chunked": chunked["peak_rss"]},
                      "logits_bytes": full["logits_bytes"], "full_logits_cost_bytes": saved,
                      "ratios": {"peak_rss": round(chunked["peak_rss"] / full["peak_rss"], 4),
                                 "cost_in_logits_tensors": round(saved / full["logits_bytes"], 3),
                                 "step_time": round(chunked["seconds"] / full["seconds"], 3)},
                      "max_loss_difference": loss_gap}))


if __name__ == "__main__":
    main()
