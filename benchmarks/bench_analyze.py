"""Benchmark: spear-mm's two-model layer analysis vs a Spectrum-style scan of ONE model.

Variants, each in a fresh subprocess (alternating, several repeats, median):

- ``analysis``: ``spear.analysis.stage.run_analyze`` on base vs adapted (streamed, batched spectra, all metrics,
  ranking.json, metrics.csv, layer_scores.png, unfrozen_parameters.yaml; ``logger=none``).
- ``spectrum_scan`` (baseline): what Spectrum does for one model: load the whole model in
  float32 with transformers, then ``torch.linalg.svdvals`` per decoder-layer matrix in a loop
  (plus its SNR, which is negligible); run with torch's default threads and with one thread
  (``spectrum_scan_t1``: LAPACK threading collapses on shared cores), and the faster of the two
  medians is the baseline.
- ``hold_both`` (memory reference): load base and adapted models in float32 with transformers
  and use every weight once (transformers maps weights lazily; untouched ones are not resident).

Wall time is measured around each subprocess (interpreter start and imports included: that is
what a user waits for); peak RSS is the child's own high-water mark (``VmHWM``). Targets: analysis time
<= 1x the one-model scan, analysis peak RSS <= 25% of holding both models.

The adapted model is ``--adapted`` when given; otherwise a deterministic stand-in for a CPT
output: the base with low-rank drift on every third layer and small dense drift everywhere,
written to a temp dir. The base is the embedded SmolLM2-135M (``--base`` to change); when it is
not prepared, a random-init model of the same architecture stands in (noted in the JSON).
Usage: ``python benchmarks/bench_analyze.py [--repeats 3] [--base DIR] [--adapted DIR]``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

SMOLLM2_CONFIG = dict(
    hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3,
    vocab_size=49152, max_position_embeddings=2048, tie_word_embeddings=True, rms_norm_eps=1e-5, rope_theta=100000.0,
)

CHILD_ANALYSIS = r"""
import json, os, sys, time
from spear.runtime import peak_rss_bytes  # VmHWM: this process's own peak (light: no torch)
t0 = time.perf_counter()
sys.path.insert(0, {root!r})
from spear.config import compose
from spear.analysis.stage import run_analyze
cfg = compose("analyze", ["base=" + {base!r}, "adapted=" + {adapted!r}, "logger=none", "progress=false",
                          "paths.output_dir=" + {out!r}])
result = run_analyze(cfg)
print("RESULT " + json.dumps({{"seconds": time.perf_counter() - t0, "maxrss_kb": peak_rss_bytes() // 1024,
                              "order": result["order"]}}))
"""

CHILD_SCAN = r"""
import json, time, os
from spear.runtime import peak_rss_bytes  # VmHWM: this process's own peak (light: no torch)
t0 = time.perf_counter()
import torch
if {threads}:
    torch.set_num_threads({threads})
from transformers import AutoModelForCausalLM
model = AutoModelForCausalLM.from_pretrained({base!r}, dtype=torch.float32)
snr = {{}}
for name, p in model.named_parameters():
    if ".layers." in name and name.endswith("proj.weight") and p.dim() == 2:
        w = p.detach().float()
        s = torch.linalg.svdvals(w)
        beta = min(w.shape) / max(w.shape)
        sigma = (torch.quantile(s, 0.75) - torch.quantile(s, 0.25)) / 1.349
        eps = sigma * (1 + beta ** 0.5)
        noise = s[s <= eps].sum()
        snr[name] = float((s[s > eps].sum() / (noise if noise > 0 else 1.0)) / s[0])
print("RESULT " + json.dumps({{"seconds": time.perf_counter() - t0, "maxrss_kb": peak_rss_bytes() // 1024,
                              "matrices": len(snr)}}))
"""

CHILD_HOLD_BOTH = r"""
import json, time
from spear.runtime import peak_rss_bytes  # VmHWM: this process's own peak (light: no torch)
t0 = time.perf_counter()
import torch
from transformers import AutoModelForCausalLM
a = AutoModelForCausalLM.from_pretrained({base!r}, dtype=torch.float32)
b = AutoModelForCausalLM.from_pretrained({adapted!r}, dtype=torch.float32)
# transformers maps the safetensors files lazily: use every weight once, as any comparison of
# the two models would, so that both are actually resident
n = 0
with torch.no_grad():
    for p in list(a.parameters()) + list(b.parameters()):
        float(p.sum())
        n += p.numel()
print("RESULT " + json.dumps({{"seconds": time.perf_counter() - t0, "maxrss_kb": peak_rss_bytes() // 1024,
                              "params": n}}))
"""


def run_child(code: str) -> dict:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "WANDB_MODE": "disabled"}
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=str(ROOT))
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        sys.stderr.write(proc.stderr[-4000:])
        raise SystemExit(f"benchmark child failed (rc {proc.returncode})")
    line = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")][-1]
    out = json.loads(line[len("RESULT ") :])
    out["wall"] = wall
    out["peak_rss_bytes"] = out["maxrss_kb"] * 1024
    return out


def resolve_base(arg: str | None, tmp: Path) -> tuple[Path, str]:
    sys.path.insert(0, str(ROOT))
    from spear.errors import SpearError
    from spear.models import resolve_model_dir

    if arg:
        return resolve_model_dir(arg), arg
    try:
        return resolve_model_dir("smollm2_135m"), "smollm2_135m"
    except SpearError:
        import torch
        from transformers import AutoConfig, AutoModelForCausalLM

        print("smollm2_135m is not prepared: using a random-init model of the same architecture", file=sys.stderr)
        cfg = AutoConfig.for_model("llama", **SMOLLM2_CONFIG)
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
        out = tmp / "base"
        model.save_pretrained(out)
        return out, "random-init smollm2_135m architecture"


def make_adapted(base: Path, out: Path) -> Path:
    """Deterministic stand-in for a CPT output: low-rank drift on every third layer, small drift everywhere."""
    import re
    import shutil

    import torch
    from safetensors import safe_open
    from safetensors.torch import save_file

    out.mkdir(parents=True)
    for f in base.iterdir():
        if f.is_file() and not f.name.endswith(".safetensors") and not f.name.endswith(".index.json"):
            shutil.copy(f, out / f.name)
    layer_re = re.compile(r"layers\.(\d+)\..*proj\.weight$")
    gen = torch.Generator().manual_seed(0)
    for f in sorted(base.glob("*.safetensors")):
        tensors = {}
        with safe_open(str(f), "pt") as h:
            for name in h.keys():
                t = h.get_tensor(name)
                m = layer_re.search(name)
                if m:
                    w = t.float()
                    scale = float(w.std())
                    w = w + 1e-2 * scale * torch.randn(w.shape, generator=gen)
                    if int(m.group(1)) % 3 == 0:
                        u = torch.randn(w.shape[0], 8, generator=gen)
                        v = torch.randn(8, w.shape[1], generator=gen)
                        w = w + 0.3 * scale * (u @ v) / 8**0.5 - 0.1 * w
                    t = w.to(t.dtype)
                tensors[name] = t.contiguous()
        save_file(tensors, str(out / f.name), metadata={"format": "pt"})
    index = base / "model.safetensors.index.json"
    if index.exists():
        shutil.copy(index, out / index.name)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--base")
    ap.add_argument("--adapted")
    args = ap.parse_args()

    with tempfile.TemporaryDirectory(prefix="bench_analyze-") as tmpdir:
        tmp = Path(tmpdir)
        base, base_name = resolve_base(args.base, tmp)
        adapted = Path(args.adapted) if args.adapted else make_adapted(base, tmp / "adapted")
        codes = {
            "analysis": lambda i: CHILD_ANALYSIS.format(root=str(ROOT), base=str(base), adapted=str(adapted), out=str(tmp / f"run{i}")),
            "spectrum_scan": lambda i: CHILD_SCAN.format(base=str(base), threads=0),
            "spectrum_scan_t1": lambda i: CHILD_SCAN.format(base=str(base), threads=1),
            "hold_both": lambda i: CHILD_HOLD_BOTH.format(base=str(base), adapted=str(adapted)),
        }
        results: dict[str, list[dict]] = {k: [] for k in codes}
        for i in range(args.repeats):
            variants = list(codes) if i % 2 == 0 else list(reversed(codes))
            for name in variants:
                r = run_child(codes[name](i))
                results[name].append(r)
                print(f"repeat {i} {name:14s} wall {r['wall']:.2f}s peak RSS {r['peak_rss_bytes'] / 2**20:.0f} MiB", file=sys.stderr)
        orders = {json.dumps(r["order"]) for r in results["analysis"]}

    med = {k: {"wall": statistics.median(r["wall"] for r in v), "rss": statistics.median(r["peak_rss_bytes"] for r in v)} for k, v in results.items()}
    scan = min(med["spectrum_scan"]["wall"], med["spectrum_scan_t1"]["wall"])  # the baseline at its best thread setting
    metrics = {
        "analysis_seconds": round(med["analysis"]["wall"], 3),
        "spectrum_scan_seconds": round(med["spectrum_scan"]["wall"], 3),
        "spectrum_scan_1thread_seconds": round(med["spectrum_scan_t1"]["wall"], 3),
        "analysis_peak_rss_mib": round(med["analysis"]["rss"] / 2**20, 1),
        "spectrum_scan_peak_rss_mib": round(med["spectrum_scan"]["rss"] / 2**20, 1),
        "hold_both_peak_rss_mib": round(med["hold_both"]["rss"] / 2**20, 1),
        "both_models_param_mib": round(results["hold_both"][0]["params"] * 4 / 2**20, 1),
        "repeats": args.repeats,
        "deterministic_order": len(orders) == 1,
    }
    ratios = {
        "time_vs_one_model_scan": round(med["analysis"]["wall"] / scan, 3),
        "peak_rss_vs_holding_both": round(med["analysis"]["rss"] / med["hold_both"]["rss"], 3),
    }
    targets = {"time_vs_one_model_scan": 1.0, "peak_rss_vs_holding_both": 0.25}
    met = all(ratios[k] <= targets[k] for k in targets) and metrics["deterministic_order"]
    print(f"model: {base_name}")
    for k, v in ratios.items():
        print(f"{k}: {v} (target <= {targets[k]})")
    print(json.dumps({"bench": "analyze", "metrics": {**metrics, "model": base_name}, "ratios": ratios, "targets": targets, "met": met}))


if __name__ == "__main__":
    main()
