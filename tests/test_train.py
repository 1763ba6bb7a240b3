"""CPT end to end on tiny_llama: freeze masks hold, outputs are complete, resume is exact,
bad input fails in one line without leaving a half-written run dir."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from spear.errors import SpearError
from spear.paths import PROJECT_ROOT


@pytest.fixture(scope="module")
def corpus(word_corpus) -> Path:
    return word_corpus(lines=120, seed=0)


def _cfg(compose, tmp_path, model_dir, corpus, *overrides, out="run"):
    return compose(
        "train",
        [
            f"model.ref={model_dir}",
            "data=text",
            f"data.paths=[{corpus}]",
            "data.block_size=32",
            "data.batch_size=2",
            f"data.cache_dir={tmp_path / 'tokens'}",
            "trainer.max_steps=3",
            "trainer.accumulate_grad_batches=1",
            "trainer.val_check_interval=2",
            "trainer.limit_val_batches=2",
            "trainer.enable_progress_bar=false",
            "optim.lr=1e-2",
            "optim.warmup_steps=1",
            *overrides,
        ],
        output_dir=tmp_path / out,
    )


def _ranking(tmp_path, order) -> Path:
    """A ranking.json (SPEC §2.4) whose scores give ``order``."""
    path = tmp_path / "ranking.json"
    scores = {layer: 1.0 - i / len(order) for i, layer in enumerate(order)}
    layers = [{"layer": layer, "score": scores[layer]} for layer in range(len(order))]
    path.write_text(json.dumps({"num_layers": len(order), "order": order, "layers": layers}))
    return path


def test_ranked_freeze_keeps_frozen_layers_bit_identical(compose, tmp_path, tiny_llama_dir, corpus):
    from spear.cpt.stage import run_train as run

    ranking = _ranking(tmp_path, [3, 1, 0, 2])
    cfg = _cfg(compose, tmp_path, tiny_llama_dir, corpus, "freeze=ranked", "freeze.k=2",
               f"freeze.ranking={ranking}", "logger=csv")
    summary = run(cfg)
    out = tmp_path / "run"
    assert summary["frozen_layers"] == [1, 3] and summary["steps"] == 3
    base = load_file(tiny_llama_dir / "model.safetensors")
    trained = load_file(out / "model" / "model.safetensors")
    assert trained.keys() == base.keys()  # complete, tied lm_head not duplicated
    for name, tensor in base.items():
        layer = int(name.split(".")[2]) if name.startswith("model.layers.") else None
        if layer in (1, 3):
            assert torch.equal(trained[name], tensor), f"frozen {name} changed"
        elif name.endswith("_proj.weight"):
            assert not torch.equal(trained[name], tensor), f"trainable {name} did not change"
    # the optimizer holds state for trainable parameters only
    ckpt = torch.load(out / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    opt = ckpt["optimizer_states"][0]
    n_opt = sum(len(g["params"]) for g in opt["param_groups"])
    assert n_opt == len(opt["state"]) == summary["freeze"]["num_trainable_params"] == 38 - 18
    # outputs
    assert summary["trainable_params"] + summary["frozen_params"] == summary["total_params"]
    listed = (out / "trainable_parameters.txt").read_text().split()
    assert len(listed) == 20 and not any(n.startswith(("model.layers.1.", "model.layers.3.")) for n in listed)
    on_disk = json.loads((out / "train_summary.json").read_text())
    for key in ("tokens_seen", "tokens_per_s", "wall_seconds", "peak_rss_bytes", "config_sha256", "seed",
                "frozen_layers", "trainable_params", "frozen_params"):
        assert key in on_disk
    assert on_disk["tokens_seen"] == 3 * 2 * 32
    assert (out / "config.yaml").read_text().startswith("task_name: train")
    assert (out / "csv" / "metrics.csv").exists()
    from transformers import AutoModelForCausalLM

    reloaded = AutoModelForCausalLM.from_pretrained(out / "model")
    assert reloaded.get_input_embeddings().weight is reloaded.get_output_embeddings().weight
    assert (out / "model" / "tokenizer.json").exists()


def test_a_trained_model_carries_its_model_card(compose, tmp_path, tiny_llama_dir, corpus):
    from spear.cpt.stage import run_train
    from spear.io.hashing import file_sha256
    from spear.models.card import front_matter

    summary = run_train(_cfg(compose, tmp_path, tiny_llama_dir, corpus, "freeze=layers", "freeze.layers=[0,2]"))
    card_path = Path(summary["model_dir"]) / "README.md"
    meta = front_matter(card_path)
    assert meta["tags"] == ["spear-mm", "continual-pretraining"] and meta["base_model"] == str(tiny_llama_dir.resolve())
    card = card_path.read_text()
    assert "frozen decoder layers: [0, 2]" in card and f"steps: {summary['steps']}" in card
    assert file_sha256(Path(summary["model_dir"]) / "model.safetensors") in card


def test_optimizer_gets_trainable_parameters_only(tiny_llama_dir):
    from spear.config.schema import FreezeConfig, OptimConfig
    from spear.cpt.freeze import apply_freeze, plan_for_model
    from spear.cpt.module import CPTModule
    from spear.models import layer_map_for, load_model

    model, _ = load_model(str(tiny_llama_dir))
    freeze = FreezeConfig(mode="first", k=3, embeddings=True)
    apply_freeze(model, plan_for_model(freeze, model, layer_map_for(model.config)))
    opt = CPTModule(model, optim=OptimConfig(), total_steps=10).configure_optimizers()["optimizer"]
    in_opt = {id(p) for g in opt.param_groups for p in g["params"]}
    assert in_opt == {id(p) for p in model.parameters() if p.requires_grad}
    decay = {id(p) for p in opt.param_groups[0]["params"]}
    assert all(p.ndim >= 2 for p in model.parameters() if id(p) in decay)


def test_resume_matches_uninterrupted_run(compose, tmp_path, tiny_llama_dir, corpus):
    from spear.cpt.stage import run_train as run

    common = ["trainer.max_steps=6", "trainer.accumulate_grad_batches=2", "checkpoint.every_n_steps=2",
              "checkpoint.keep=-1", "freeze=last", "freeze.k=1", "data.val_fraction=0.2"]
    # 6 steps of 2 accumulated batches over epochs of 3-5 batches: resuming starts mid-epoch, crosses an epoch
    # boundary, and an odd epoch ends in a short accumulation
    full = run(_cfg(compose, tmp_path, tiny_llama_dir, corpus, "data.block_size=256", "data.batch_size=8", *common,
                    out="full"))
    assert 2 < full["data"]["train_blocks"] // 8 < 6
    ckpts = sorted((tmp_path / "full" / "checkpoints").glob("step-*.ckpt"))
    assert [c.name for c in ckpts] == ["step-000002.ckpt", "step-000004.ckpt", "step-000006.ckpt"]
    for ckpt in ("step-000002.ckpt", "step-000004.ckpt"):
        out = f"resumed-{ckpt}"
        resumed = run(_cfg(compose, tmp_path, tiny_llama_dir, corpus, "data.block_size=256", "data.batch_size=8",
                           *common, f"ckpt_path={tmp_path / 'full' / 'checkpoints' / ckpt}", out=out))
        assert resumed["steps"] == 6 and resumed["tokens_seen"] == full["tokens_seen"]
        a = load_file(tmp_path / "full" / "model" / "model.safetensors")
        b = load_file(tmp_path / out / "model" / "model.safetensors")
        for name in a:
            assert torch.equal(a[name], b[name]), f"{name} differs after resuming from {ckpt}"


@pytest.mark.parametrize(
    "overrides, match",
    [
        (["freeze=ranked", "freeze.k=2", "freeze.ranking=RANK30"], "has 30 layers but the model has 4; set freeze.ranking"),
        (["freeze=last", "freeze.k=9"], "freeze.k=9 is out of range"),
        (["freeze=last", "freeze.k=1", "freeze.modules=[self_attn.x_proj]"], "unknown"),
        (["data.paths=[EMPTY]"], "holds no text"),
        (["optim.lr=0"], "optim.lr"),
        (["ckpt_path=/nonexistent/ckpt"], "ckpt_path"),
        (["trainer=deepspeed_zero2"], "spear-mm\\[deepspeed\\]"),
    ],
)
def test_bad_input_fails_before_writing(compose, tmp_path, tiny_llama_dir, corpus, overrides, match):
    from spear.cpt.stage import run_train as run
    from spear.cpt.strategies import deepspeed_available

    if "deepspeed" in overrides[0] and deepspeed_available():
        pytest.skip("deepspeed is installed here")
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    rank30 = _ranking(tmp_path, list(range(30)))
    overrides = [o.replace("RANK30", str(rank30)).replace("EMPTY", str(empty)) for o in overrides]
    with pytest.raises(SpearError, match=match) as err:
        run(_cfg(compose, tmp_path, tiny_llama_dir, corpus, *overrides))
    assert "\n" not in str(err.value)
    assert not (tmp_path / "run").exists()


def test_cli_bad_input_exits_nonzero_with_one_line(tmp_path, tiny_llama_dir):
    empty = tmp_path / "empty.txt"
    empty.write_text("   \n")
    run_dir = tmp_path / "cli-run"
    env = {**os.environ, "SPEAR_HOME": str(tmp_path / "home")}
    proc = subprocess.run(
        [sys.executable, "-m", "spear.train", f"model.ref={tiny_llama_dir}", "data=text", f"data.paths=[{empty}]",
         "logger=none", f"hydra.run.dir={run_dir}"],
        capture_output=True, text=True, cwd=PROJECT_ROOT, env=env, timeout=300,
    )
    assert proc.returncode == 2
    lines = [line for line in proc.stderr.strip().splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "holds no text" in lines[0] and "Traceback" not in proc.stderr
    assert not run_dir.exists()


def test_existing_model_needs_overwrite(compose, tmp_path, tiny_llama_dir, corpus):
    from spear.cpt.stage import run_train as run

    (tmp_path / "run" / "model").mkdir(parents=True)
    with pytest.raises(SpearError, match="overwrite=true"):
        run(_cfg(compose, tmp_path, tiny_llama_dir, corpus))


def test_experiments_compose(compose):
    top8 = compose("train", ["+experiment=freeze_top8"])
    assert top8.freeze.mode == "ranked" and top8.freeze.k == 8 and top8.freeze.ranking is None
    last8 = compose("train", ["+experiment=freeze_last8"])
    assert last8.freeze.mode == "last" and last8.freeze.k == 8
    default = compose("train")
    assert default.trainer["accelerator"] == "cpu" and default.freeze.mode == "none"
    assert default.data.paths == ["asset:finance_train"] and default.model.ref == "smollm2_135m"


TRAINER_CONFIGS = sorted(p.stem for p in (PROJECT_ROOT / "conf" / "trainer").glob("*.yaml"))


@pytest.mark.parametrize("name", TRAINER_CONFIGS)
def test_every_trainer_config_composes_and_instantiates(compose, name):
    import pytorch_lightning as pl

    from spear.cpt.strategies import build_trainer, deepspeed_available, trainer_kwargs

    assert set(TRAINER_CONFIGS) >= {"cpu", "gpu", "ddp", "deepspeed_zero2", "deepspeed_zero3", "fsdp"}
    cfg = compose("train", [f"trainer={name}", "trainer.max_steps=2"])
    assert cfg.trainer["max_steps"] == 2 and cfg.trainer["_target_"] == "pytorch_lightning.Trainer"
    quiet = {"logger": False, "enable_progress_bar": False}
    if name.startswith("deepspeed") and not deepspeed_available():
        with pytest.raises(SpearError, match=r"pip install 'spear-mm\[deepspeed\]'") as err:
            build_trainer(cfg.trainer, **quiet)
        assert "\n" not in str(err.value)
        return
    kwargs = trainer_kwargs(cfg.trainer)  # builds the strategy object (lazy factories)
    if name == "fsdp":
        from pytorch_lightning.strategies import FSDPStrategy

        assert isinstance(kwargs["strategy"], FSDPStrategy)
    if cfg.trainer["accelerator"] == "cpu" or torch.cuda.is_available():
        assert isinstance(build_trainer(cfg.trainer, **quiet), pl.Trainer)
        return
    with pytest.raises(SpearError, match="needs a CUDA GPU"):
        build_trainer(cfg.trainer, **quiet)
    if name in ("gpu", "ddp"):  # the same config on CPU processes instantiates
        trainer = build_trainer(cfg.trainer, accelerator="cpu", precision="32-true", **quiet)
        assert trainer.max_steps == 2


def test_hydra_instantiate_cpu_trainer(compose):
    from hydra.utils import instantiate

    trainer = instantiate(compose("train", ["trainer.max_steps=2"]).trainer, logger=False, enable_progress_bar=False)
    assert trainer.max_steps == 2 and trainer.precision == "32-true"


def test_wandb_offline_logger(compose, tmp_path, tiny_llama_dir, corpus):
    from spear.cpt.stage import run_train as run

    cfg = _cfg(compose, tmp_path, tiny_llama_dir, corpus, "logger=wandb", "trainer.max_steps=1",
               "checkpoint.enabled=false")
    summary = run(cfg)
    assert summary["steps"] == 1
    assert list((tmp_path / "run" / "wandb").glob("offline-run-*"))


@pytest.mark.slow
def test_short_real_run_on_smollm2(compose, tmp_path):
    from spear.cpt.stage import run_train as run
    from spear.embedded import asset_path
    from spear.models import resolve_model_dir

    try:
        resolve_model_dir("smollm2_135m")
        asset_path("finance_train")
    except SpearError as err:
        pytest.skip(f"embedded assets not prepared: {err}")
    cfg = compose("train", ["trainer.max_steps=3", "data.block_size=64", "data.batch_size=2",
                            "trainer.val_check_interval=3", "trainer.limit_val_batches=1",
                            "checkpoint.enabled=false", "freeze=last", "freeze.k=8",
                            "trainer.enable_progress_bar=false"], output_dir=tmp_path / "run")
    summary = run(cfg)
    assert summary["steps"] == 3 and summary["frozen_layers"] == list(range(22, 30))
    assert summary["final_metrics"].get("val/ppl") is not None
    base = load_file(resolve_model_dir("smollm2_135m") / "model.safetensors")
    trained = load_file(tmp_path / "run" / "model" / "model.safetensors")
    assert torch.equal(base["model.layers.29.mlp.up_proj.weight"], trained["model.layers.29.mlp.up_proj.weight"])
    assert not torch.equal(base["model.layers.0.mlp.up_proj.weight"], trained["model.layers.0.mlp.up_proj.weight"])


def test_gradient_checkpointing_with_frozen_embeddings(compose, tmp_path, tiny_llama_dir, corpus):
    """Non-reentrant checkpointing still trains layers above frozen embeddings and layers."""
    from spear.cpt.stage import run_train as run

    cfg = _cfg(compose, tmp_path, tiny_llama_dir, corpus, "gradient_checkpointing=true", "freeze=first",
               "freeze.k=1", "freeze.embeddings=true", "trainer.max_steps=2", "checkpoint.enabled=false")
    summary = run(cfg)
    assert summary["freeze"]["embeddings"] == "both" and "model.embed_tokens.weight" in summary["frozen_parameter_names"]
    base = load_file(tiny_llama_dir / "model.safetensors")
    trained = load_file(tmp_path / "run" / "model" / "model.safetensors")
    assert torch.equal(base["model.embed_tokens.weight"], trained["model.embed_tokens.weight"])
    assert torch.equal(base["model.layers.0.mlp.up_proj.weight"], trained["model.layers.0.mlp.up_proj.weight"])
    assert not torch.equal(base["model.layers.1.mlp.up_proj.weight"], trained["model.layers.1.mlp.up_proj.weight"])


def test_the_summary_accounts_for_the_cpt_memory(compose, tmp_path, tiny_llama_dir, corpus):
    """Peak RSS next to its measured parts: AdamW state is two float32 tensors (and a step) per trainable
    parameter only, gradients are the trainable bytes, and the activations saved for backward scale with the batch."""
    from spear.cpt.stage import run_train

    memory = {}
    for batch in (2, 4):
        summary = run_train(_cfg(compose, tmp_path, tiny_llama_dir, corpus, "freeze=first", "freeze.k=2",
                                 f"data.batch_size={batch}", "checkpoint.enabled=false", out=f"run{batch}"))
        memory[batch] = summary["memory"]
    m = memory[2]
    trainable_bytes = 4 * summary["trainable_params"]
    assert m["grad_bytes"] == trainable_bytes < m["weights_bytes"] == 4 * summary["total_params"]
    assert m["optimizer_state_bytes"] == 2 * trainable_bytes + 4 * summary["freeze"]["num_trainable_params"]
    vocab = 259  # the byte tokenizer's vocabulary: the float32 log-softmax of the logits is saved for backward
    assert m["activation_bytes"] >= 2 * 32 * vocab * 4
    assert 1.8 <= memory[4]["activation_bytes"] / m["activation_bytes"] <= 2.2
    assert m["expected_peak_bytes"] == m["rss_at_start_bytes"] + m["grad_bytes"] + m["optimizer_state_bytes"] + m["activation_bytes"]
    assert m["unexplained_bytes"] == m["peak_rss_bytes"] - m["expected_peak_bytes"]
