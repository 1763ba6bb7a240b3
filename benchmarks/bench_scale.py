"""Benchmark: how analysis and merge grow with the model, on checkpoints shaped like real ones.

For each ``--size`` it writes a synthetic base/adapted pair with the exact tensor names, shapes and
dtype of a real architecture (random weights; adapted = base + a rank-8 drift + 1% noise), sharded
as ``save_pretrained`` writes them (5 GB shards with an index). Then, each as a whole process:

- ``analyze``: ``python -m spear.analyze`` on the pair (spectra of every decoder matrix, ranking);
- ``merge``: ``python -m spear.merge`` with the analysis' ranking (``policy=balanced``, SLERP);
- ``io_floor`` (baseline): read both checkpoints tensor by tensor and write one of them, no math
  (the same loop ``bench_merge.py`` uses): the least a merge must do for the same bytes.

Printed per stage: bytes read, wall time, seconds per GB, the ratio to the I/O floor, and peak
RSS (each child's own VmHWM) next to the largest tensor in float32.
Targets (recorded, not asserted): peak RSS does not grow with the number of layers (a small
multiple of the largest float32 tensor), and seconds per GB within 1.5x of the 135M-shaped pair's
(``--size 135m`` is always measured first as the reference, in the same run).

Sizes: ``135m`` (SmolLM2-135M, 0.27 GB per model in bf16), ``1b`` (Llama-3.2-1B, 2.5 GB), ``8b``
(Llama-3.1-8B, 16 GB per model: the pair and one model-sized output at a time need ~48 GB of free disk).
Pairs are written once to ``--work`` and reused. The machine's load average is recorded: on a
shared machine the times are upper bounds. Usage: ``python benchmarks/bench_scale.py [--size 1b] [--size 8b]``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_merge import CHILD_FLOOR, child_env  # noqa: E402  (the same floor loop for both benchmarks)

# Llama-family shapes (config.json values of the released models).
ARCHITECTURES = {
    "135m": dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                 num_key_value_heads=3, vocab_size=49152, tie_word_embeddings=True, rope_theta=100000.0),
    "1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
               num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=True, rope_theta=500000.0),
    "8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
               num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=False, rope_theta=500000.0),
}
SHARD = "5GB"  # save_pretrained's default max_shard_size
DRIFT_RANK, DRIFT_SCALE, NOISE_SCALE = 8, 0.05, 0.01


MARKER = ".spear-bench-scale"  # in every size dir this benchmark creates: the only dirs it ever cleans


def own_dir(path: Path) -> Path:
    """``path``, created and marked by this benchmark; an existing dir it did not mark is refused, untouched."""
    if path.exists() and not (path / MARKER).exists():
        raise SystemExit(f"error: {path} exists and was not written by bench_scale.py; choose another --work")
    path.mkdir(parents=True, exist_ok=True)
    (path / MARKER).touch()
    return path


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def tensor_specs(size: str):
    """(config, [(name, shape)]) of the architecture, from a meta-device model (no memory)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(**ARCHITECTURES[size], max_position_embeddings=8192, torch_dtype="bfloat16")
    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    return config, [(name, tuple(p.shape)) for name, p in model.named_parameters()]  # tied lm_head: listed once


def write_pair(size: str, work: Path) -> tuple[Path, Path, dict]:
    """The synthetic pair of ``size`` under ``work`` (reused when complete), one tensor in memory at a time."""
    import torch

    from spear.io.atomic import atomic_dir
    from spear.io.writer import ShardedSafetensorsWriter, TensorSpec
    from spear.models.tiny import byte_tokenizer

    config, specs = tensor_specs(size)
    root = own_dir(work / size)
    dirs = (root / "base", root / "adapted")
    info = {"tensors": len(specs), "params": sum(int(torch.Size(s).numel()) for _, s in specs),
            "largest_tensor_f32_bytes": max(int(torch.Size(s).numel()) * 4 for _, s in specs),
            "layers": config.num_hidden_layers}
    if all((d / "config.json").exists() for d in dirs):
        return *dirs, info
    log(f"writing the {size} pair ({info['params'] / 1e9:.2f}B params, bf16) to {work / size}")
    st_specs = [TensorSpec(name, "BF16", shape) for name, shape in specs]
    gen = torch.Generator().manual_seed(0)
    for d in dirs:
        shutil.rmtree(d, ignore_errors=True)
    with atomic_dir(dirs[0]) as base_tmp, atomic_dir(dirs[1]) as adapted_tmp, \
            ShardedSafetensorsWriter(base_tmp, st_specs, SHARD) as base_out, \
            ShardedSafetensorsWriter(adapted_tmp, st_specs, SHARD) as adapted_out:
        for name, shape in specs:
            if len(shape) == 1:
                base = torch.ones(shape)
                adapted = base + NOISE_SCALE * torch.randn(shape, generator=gen)
            else:
                base = 0.02 * torch.randn(shape, generator=gen)
                drift = torch.randn(shape[0], DRIFT_RANK, generator=gen) @ torch.randn(DRIFT_RANK, shape[1], generator=gen)
                # entries of std 1 scaled to DRIFT_SCALE / NOISE_SCALE of the weights' std
                adapted = base + 0.02 * (DRIFT_SCALE * drift / DRIFT_RANK ** 0.5 + NOISE_SCALE * torch.randn(shape, generator=gen))
            base_out.write(name, base.to(torch.bfloat16))
            adapted_out.write(name, adapted.to(torch.bfloat16))
            del base, adapted
        tokenizer = byte_tokenizer()  # a merge needs one to copy; which one does not change the costs
        for tmp in (base_tmp, adapted_tmp):
            config.save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)
    return *dirs, info


# Runs a stage's module as __main__ and prints the process's own VmHWM: a child's ru_maxrss would
# carry this (large) parent's peak across fork + exec.
CHILD_STAGE = r"""
import runpy, sys
sys.argv = [{module!r}, *{argv!r}]
try:
    runpy.run_module({module!r}, run_name="__main__", alter_sys=True)
finally:
    hwm = next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmHWM:"))
    print("RESULT {{\"hwm_kb\": %d}}" % hwm, flush=True)
"""


def timed_process(cmd: list[str], timeout: float = 7200) -> tuple[float, int, str]:
    """(wall seconds, the child's own peak RSS in bytes, stdout) of ``cmd``, a ``python -c`` child that
    ends with a ``RESULT {"hwm_kb": ...}`` line."""
    start = time.perf_counter()
    proc = subprocess.run(cmd, env=child_env(), cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd[:4])} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    result = json.loads(next(ln for ln in reversed(proc.stdout.splitlines()) if ln.startswith("RESULT "))[7:])
    return wall, result["hwm_kb"] * 1024, proc.stdout


def stage_process(module: str, *argv: str) -> tuple[float, int, str]:
    return timed_process([sys.executable, "-c", CHILD_STAGE.format(module=module, argv=list(argv))])


def model_bytes(model_dir: Path) -> int:
    return sum(f.stat().st_size for f in model_dir.glob("*.safetensors"))


def measure(size: str, work: Path) -> dict:
    base, adapted, info = write_pair(size, work)
    runs = work / size / "runs"
    shutil.rmtree(runs, ignore_errors=True)  # our own outputs of an earlier run of this benchmark
    common = ["logger=none", "progress=false", "model.ref=" + str(base), f"base={base}", f"adapted={adapted}"]
    pair_bytes = model_bytes(base) + model_bytes(adapted)
    row = {"size": size, **info, "bytes_per_model": model_bytes(base)}

    log(f"[{size}] analyze")
    wall, rss, _ = stage_process("spear.analyze", *common, f"hydra.run.dir={runs / 'analyze'}")
    row["analyze"] = {"wall_s": round(wall, 2), "peak_rss_bytes": rss, "bytes_read": pair_bytes}

    log(f"[{size}] merge")
    ranking = runs / "analyze" / "ranking.json"
    wall, rss, _ = stage_process("spear.merge", *common, f"ranking={ranking}", f"hydra.run.dir={runs / 'merge'}")
    report = json.loads((runs / "merge" / "merge_report.json").read_text())
    row["merge"] = {"wall_s": round(wall, 2), "peak_rss_bytes": rss, "bytes_read": pair_bytes,
                    "bytes_written": model_bytes(runs / "merge" / "model"), "loop_s": report.get("seconds")}
    shutil.rmtree(runs / "merge" / "model")  # what this benchmark wrote; the disk is needed for the next size

    log(f"[{size}] io floor")
    floor_out = runs / "floor"
    code = CHILD_FLOOR.format(root=str(ROOT), base=str(base), adapted=str(adapted), out=str(floor_out))
    wall, rss, stdout = timed_process([sys.executable, "-c", code])
    shutil.rmtree(floor_out, ignore_errors=True)
    floor = json.loads(next(ln for ln in reversed(stdout.splitlines()) if ln.startswith("RESULT "))[7:])
    rss = floor["hwm_kb"] * 1024
    row["io_floor"] = {"wall_s": round(wall, 2), "peak_rss_bytes": rss, "loop_s": round(floor["loop_seconds"], 2)}

    gb = pair_bytes / 1e9
    for name in ("analyze", "merge"):
        part = row[name]
        part["s_per_gb"] = round(part["wall_s"] / gb, 3)
        part["vs_io_floor"] = round(part["wall_s"] / row["io_floor"]["wall_s"], 2)
        part["rss_vs_largest_tensor_f32"] = round(part["peak_rss_bytes"] / info["largest_tensor_f32_bytes"], 2)
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", action="append", choices=sorted(set(ARCHITECTURES) - {"135m"}),
                    help="sizes to measure after the 135m reference (repeatable; default: 1b)")
    ap.add_argument("--work", default=str(Path(tempfile.gettempdir()) / "spear-bench-scale"))
    args = ap.parse_args()
    sizes = ["135m", *(args.size or ["1b"])]
    work = Path(args.work)
    # GB each size still needs: its pair (unless written before) plus one model-sized output at a time
    pair, out = {"135m": 0.6, "1b": 5.0, "8b": 32.2}, {"135m": 0.3, "1b": 2.5, "8b": 16.1}
    need = sum(out[s] + (0 if (work / s / "adapted" / "config.json").exists() else pair[s]) for s in sizes)
    free = shutil.disk_usage(work if work.exists() else work.parent).free / 1e9
    if need > free:
        raise SystemExit(f"error: {free:.0f} GB free under {work}, the sizes {sizes} need ~{need:.0f} GB; "
                         "choose another --work or a smaller --size")
    load_before = os.getloadavg()[0]
    rows = [measure(size, work) for size in sizes]
    ref = rows[0]
    print(f"{'size':>5} {'stage':>8} {'GB read':>8} {'wall s':>8} {'s/GB':>7} {'vs 135m':>8} {'vs floor':>9} "
          f"{'peak RSS GB':>12} {'/ largest f32':>14}")
    for row in rows:
        for name in ("analyze", "merge"):
            part = row[name]
            part["s_per_gb_vs_135m"] = round(part["s_per_gb"] / ref[name]["s_per_gb"], 2)
            print(f"{row['size']:>5} {name:>8} {part['bytes_read'] / 1e9:8.2f} {part['wall_s']:8.1f} {part['s_per_gb']:7.2f} "
                  f"{part['s_per_gb_vs_135m']:8.2f} {part['vs_io_floor']:9.2f} {part['peak_rss_bytes'] / 1e9:12.2f} "
                  f"{part['rss_vs_largest_tensor_f32']:14.2f}")
    largest = rows[-1]
    print(json.dumps({"benchmark": "scale", "baseline": "io_floor and the 135m-shaped pair", "rows": rows,
                      "load_avg_before": round(load_before, 2), "load_avg_after": round(os.getloadavg()[0], 2),
                      "cpus": os.cpu_count(),
                      "target_time_per_gb_within_1.5x": all(largest[n]["s_per_gb_vs_135m"] <= 1.5 for n in ("analyze", "merge"))}))


if __name__ == "__main__":
    main()
