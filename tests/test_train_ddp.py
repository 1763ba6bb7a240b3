"""Multi-process CPT on CPU (``trainer=ddp_cpu``: Lightning DDP over gloo, 2 processes) against one
process with the same global batch: the same losses and weights within float tolerance, frozen
parameters bit-identical to the base and without optimizer state on every rank, a complete export."""

from __future__ import annotations

import csv
import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from spear.paths import PROJECT_ROOT

TESTS_DIR = Path(__file__).resolve().parent
FROZEN_LAYERS = (0, 2)


@pytest.fixture(scope="module")
def corpus(word_corpus) -> Path:
    return word_corpus(lines=160, seed=1)


def _train(run_dir: Path, *overrides: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(TESTS_DIR), os.environ.get("PYTHONPATH", "")]),
           "SPEAR_ALLOWED_TARGETS": "rank_probe"}  # the test's own callback, allowed the documented way
    for var in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "NODE_RANK", "MASTER_PORT"):
        env.pop(var, None)
    cmd = [sys.executable, "-m", "spear.train", "logger=csv", "trainer.log_every_n_steps=1",
           "trainer.enable_progress_bar=false", "+callbacks.probe._target_=rank_probe.RankProbe",
           f"hydra.run.dir={run_dir}", *overrides]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=PROJECT_ROOT, env=env, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def _losses(run_dir: Path) -> list[float]:
    with open(run_dir / "csv" / "metrics.csv") as handle:
        return [float(row["train/loss"]) for row in csv.DictReader(handle) if row.get("train/loss")]


def _sha(tensor: torch.Tensor) -> str:
    return hashlib.sha256(tensor.contiguous().numpy().tobytes()).hexdigest()


def _compare(tmp_path: Path, base_dir: Path, common: list[str], per_process_batch: int, rtol: float) -> None:
    single, ddp = tmp_path / "single", tmp_path / "ddp"
    _train(single, "trainer=cpu", f"data.batch_size={2 * per_process_batch}", *common)
    _train(ddp, "trainer=ddp_cpu", f"data.batch_size={per_process_batch}", *common)

    summary = json.loads((ddp / "train_summary.json").read_text())
    assert summary["trainer"]["world_size"] == 2 and summary["trainer"]["strategy"] == "DDPStrategy"
    assert summary["tokens_seen"] == json.loads((single / "train_summary.json").read_text())["tokens_seen"]
    assert _losses(ddp) == pytest.approx(_losses(single), rel=rtol) and len(_losses(ddp)) == summary["steps"]

    base = load_file(base_dir / "model.safetensors")
    trained = {name: load_file(run / "model" / "model.safetensors") for name, run in (("single", single), ("ddp", ddp))}
    assert trained["ddp"].keys() == base.keys()  # complete export
    frozen = {n for n in base if n.startswith(tuple(f"model.layers.{i}." for i in FROZEN_LAYERS))}
    for name, tensor in base.items():
        if name in frozen:
            assert torch.equal(trained["ddp"][name], tensor), f"frozen {name} changed"
        else:
            torch.testing.assert_close(trained["ddp"][name], trained["single"][name], rtol=rtol, atol=rtol)
    for rank in (0, 1):  # what every rank held, not only rank 0's export
        probe = json.loads((ddp / f"rank{rank}.json").read_text())
        assert probe["world_size"] == 2 and set(probe["frozen"]) == frozen
        assert all(probe["frozen"][n] == _sha(base[n]) for n in frozen)
        assert probe["optimizer_params"] == probe["optimizer_states"] == probe["trainable"] == len(base) - len(frozen)

    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(ddp / "model")  # the export loads


def test_ddp_on_two_cpu_processes_matches_one_process(tiny_llama_dir, corpus, tmp_path):
    common = [f"model.ref={tiny_llama_dir}", "data=text", f"data.paths=[{corpus}]", "data.block_size=32",
              f"data.cache_dir={tmp_path / 'tokens'}", "trainer.max_steps=4", "trainer.val_check_interval=2",
              "trainer.limit_val_batches=2", "optim.lr=1e-2", "optim.warmup_steps=1", "freeze=layers",
              f"freeze.layers=[{','.join(map(str, FROZEN_LAYERS))}]", "checkpoint.enabled=false"]
    _compare(tmp_path, tiny_llama_dir, common, per_process_batch=2, rtol=1e-4)


@pytest.mark.slow
def test_ddp_on_two_cpu_processes_on_smollm2(tmp_path):
    from spear.errors import SpearError
    from spear.models import resolve_model_dir

    try:
        base_dir = resolve_model_dir("smollm2_135m")
    except SpearError as err:
        pytest.skip(f"embedded assets not prepared: {err}")
    common = ["data.block_size=64", "trainer.max_steps=2", "trainer.val_check_interval=2", "trainer.limit_val_batches=1",
              "freeze=layers", f"freeze.layers=[{','.join(map(str, FROZEN_LAYERS))}]", "checkpoint.enabled=false"]
    _compare(tmp_path, base_dir, common, per_process_batch=1, rtol=1e-3)
