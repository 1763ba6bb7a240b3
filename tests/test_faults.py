"""Bad models and corpora fail with one line before anything is written (issue: reliability).

Each case: a ``SpearError`` whose message names the file or the config key to fix, one line, and
no partial output in the run dir."""

from __future__ import annotations

import json
import shutil
import stat

import pytest
import torch
from safetensors.torch import load_file, save_file

from spear.errors import SpearError

TEXT = "The ledger records every debit and credit; the balance sheet lists assets and liabilities. " * 20


def _evaluate(compose, model_dir, out, *extra):
    from spear.evaluation.stage import run_evaluate

    corpus = out.parent / "general.txt"
    corpus.write_text(TEXT)
    cfg = compose("evaluate", ["model=tiny_llama", f"model.ref={model_dir}", "eval=perplexity",
                               f"proxy.general.source={corpus}", f"proxy.domain.source={corpus}",
                               "proxy.general.max_tokens=128", "proxy.domain.max_tokens=128", *extra], output_dir=out)
    return run_evaluate(cfg)


def _one_line_error(call, match: str) -> str:
    with pytest.raises(SpearError, match=match) as err:
        call()
    assert "\n" not in str(err.value)
    return str(err.value)


def test_nan_weight_is_an_error_naming_the_tensor(compose, tiny_llama_copy, tmp_path):
    weights = tiny_llama_copy / "model.safetensors"
    tensors = load_file(weights)
    tensors["model.layers.1.mlp.up_proj.weight"][0, 0] = float("nan")
    save_file(tensors, weights, metadata={"format": "pt"})
    out = tmp_path / "run"
    _one_line_error(lambda: _evaluate(compose, tiny_llama_copy, out), "model.layers.1.mlp.up_proj.weight holds NaN")
    assert not (out / "results.json").exists()


def test_truncated_safetensors_is_an_error_before_transformers_reads_it(compose, tiny_llama_copy, tmp_path):
    weights = tiny_llama_copy / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    _one_line_error(lambda: _evaluate(compose, tiny_llama_copy, tmp_path / "run"), "truncated")


def test_model_dir_without_tokenizer(compose, tiny_llama_copy, tmp_path):
    for f in tiny_llama_copy.iterdir():
        if "token" in f.name or f.name == "special_tokens_map.json":
            f.unlink()
    _one_line_error(lambda: _evaluate(compose, tiny_llama_copy, tmp_path / "run"), "has no usable tokenizer")


def test_remote_code_names_the_key(compose, tiny_llama_copy, tmp_path):
    config = json.loads((tiny_llama_copy / "config.json").read_text())
    config.update(model_type="spear_custom", auto_map={"AutoConfig": "configuration_custom.CustomConfig",
                                                     "AutoModelForCausalLM": "modeling_custom.CustomForCausalLM"})
    (tiny_llama_copy / "config.json").write_text(json.dumps(config))
    _one_line_error(lambda: _evaluate(compose, tiny_llama_copy, tmp_path / "run"), "model.trust_remote_code=true")


def test_binary_perplexity_corpus_is_not_decoded_by_guess(compose, tiny_llama_dir, tmp_path):
    binary = tmp_path / "corpus.bin"
    binary.write_bytes(bytes(range(256)) * 40)
    out = tmp_path / "run"
    _one_line_error(lambda: _evaluate(compose, tiny_llama_dir, out, f"proxy.domain.source={binary}"),
                    "proxy.domain.source=.*is not UTF-8")
    assert not (out / "results.json").exists()


def test_merged_model_dir_gets_the_usual_permissions(tiny_llama_dir, tmp_path):
    from spear.config.schema import SlerpMerge
    from spear.merging.plan import TMap
    from spear.merging.streaming import merge_checkpoints

    adapted = tmp_path / "adapted"
    shutil.copytree(tiny_llama_dir, adapted)
    out = tmp_path / "merged"
    merge_checkpoints(tiny_llama_dir, adapted, out, TMap.of_layers({0: 0.5}), SlerpMerge(), progress=False)
    assert stat.S_IMODE(out.stat().st_mode) == 0o777 & ~_umask()
    assert torch.equal(load_file(out / "model.safetensors")["model.norm.weight"],
                       load_file(adapted / "model.safetensors")["model.norm.weight"])


def _umask() -> int:
    import os

    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_merge_takes_the_base_tokenizer_when_the_adapted_dir_has_none(tiny_llama_dir, tmp_path):
    from spear.config.schema import SlerpMerge
    from spear.merging.plan import TMap
    from spear.merging.streaming import has_tokenizer, merge_checkpoints
    from spear.models import load_model

    adapted = tmp_path / "adapted"
    shutil.copytree(tiny_llama_dir, adapted)
    for f in adapted.iterdir():
        if "token" in f.name:
            f.unlink()
    assert not has_tokenizer(adapted)
    result = merge_checkpoints(tiny_llama_dir, adapted, tmp_path / "merged", TMap(), SlerpMerge(), progress=False)
    assert result["tokenizer_from"] == "base"
    load_model(str(tmp_path / "merged"))  # loads, tokenizer included
    bare = tmp_path / "bare_base"
    shutil.copytree(adapted, bare)
    _one_line_error(lambda: merge_checkpoints(bare, adapted, tmp_path / "never", TMap(), SlerpMerge(), progress=False),
                    "holds a tokenizer")
    assert not (tmp_path / "never").exists()


def test_analyze_refuses_nan_in_a_norm_weight(compose, tiny_llama_dir, tiny_llama_copy, tmp_path):
    from spear.analysis.stage import run_analyze

    weights = tiny_llama_copy / "model.safetensors"
    tensors = load_file(weights)
    tensors["model.layers.2.post_attention_layernorm.weight"][3] = float("inf")
    save_file(tensors, weights, metadata={"format": "pt"})
    out = tmp_path / "run"
    cfg = compose("analyze", [f"base={tiny_llama_dir}", f"adapted={tiny_llama_copy}", "progress=false"], output_dir=out)
    _one_line_error(lambda: run_analyze(cfg), "model.layers.2.post_attention_layernorm.weight")
    assert not (out / "ranking.json").exists()


def test_a_second_writer_of_an_output_fails_fast_and_the_first_completes(tiny_llama_dir, tmp_path):
    """Two merges into one output: the second names the first's pid and touches nothing of it."""
    import subprocess
    import sys
    import time

    from spear.config.schema import SlerpMerge
    from spear.merging.plan import TMap
    from spear.merging.streaming import merge_checkpoints
    from spear.paths import PROJECT_ROOT

    adapted = tmp_path / "adapted"
    shutil.copytree(tiny_llama_dir, adapted)
    out, marker = tmp_path / "merged", tmp_path / "started"
    code = f"""
import time
from pathlib import Path
from spear.config.schema import SlerpMerge
from spear.merging.plan import TMap
from spear.merging.streaming import merge_checkpoints
def slow(name):
    Path({str(marker)!r}).touch()
    time.sleep(0.1)
merge_checkpoints(Path({str(tiny_llama_dir)!r}), Path({str(adapted)!r}), Path({str(out)!r}), TMap.of_layers({{1: 0.5}}),
                  SlerpMerge(), progress=False, on_tensor=slow)
"""
    first = subprocess.Popen([sys.executable, "-c", code], cwd=PROJECT_ROOT)
    try:
        deadline = time.time() + 120
        while not marker.exists() and time.time() < deadline and first.poll() is None:
            time.sleep(0.05)
        assert marker.exists(), "the first merge never started writing"
        message = _one_line_error(
            lambda: merge_checkpoints(tiny_llama_dir, adapted, out, TMap(), SlerpMerge(), progress=False),
            f"{out} is being written by pid {first.pid}; wait for it or choose another hydra.run.dir")
        assert str(first.pid) in message
    finally:
        assert first.wait(timeout=300) == 0
    assert (out / "model.safetensors").exists() and not list(tmp_path.glob(".tmp-merged-*"))


def test_parallel_jobs_compute_a_shared_stage_once(tmp_path):
    """Jobs sharing a stage cache: whoever holds a key computes it; the others wait and reuse it."""
    import subprocess
    import sys

    from spear.paths import PROJECT_ROOT

    log = tmp_path / "computed.log"
    code = f"""
import time
from pathlib import Path
from spear.io.artifacts import StageCache
cache = StageCache(Path({str(tmp_path / 'cache')!r}))
with cache.claim("train", "k") as entry:
    if entry.result is None:
        with open({str(log)!r}, "a") as fh:
            fh.write("computed\\n")
        time.sleep(1.0)
        entry.complete({{"model_dir": "m"}})
print(entry.result)
"""
    jobs = [subprocess.Popen([sys.executable, "-c", code], cwd=PROJECT_ROOT, stdout=subprocess.PIPE, text=True)
            for _ in range(2)]
    outputs = [job.communicate(timeout=120)[0] for job in jobs]
    assert all(job.returncode == 0 for job in jobs)
    assert log.read_text() == "computed\n"
    assert all("'model_dir': 'm'" in out for out in outputs)


def test_truncated_lightning_checkpoint_is_one_line(tmp_path):
    from spear.cpt.stage import resolve_ckpt_path

    ckpt = tmp_path / "checkpoints" / "last.ckpt"
    ckpt.parent.mkdir()
    torch.save({"state_dict": {"w": torch.zeros(1024)}, "pytorch-lightning_version": "2.6.0"}, ckpt)
    assert resolve_ckpt_path(str(tmp_path)) == str(ckpt)  # a run dir finds checkpoints/last.ckpt
    ckpt.write_bytes(ckpt.read_bytes()[:100])
    _one_line_error(lambda: resolve_ckpt_path(str(tmp_path)), "ckpt_path=.*not a readable checkpoint")


def test_a_merge_killed_between_model_and_report_says_what_to_do(compose, tiny_llama_dir, tmp_path):
    from spear.merging.stage import run_merge

    adapted = tmp_path / "adapted"
    shutil.copytree(tiny_llama_dir, adapted)
    out = tmp_path / "run"
    common = [f"base={tiny_llama_dir}", f"adapted={adapted}", "policy=uniform", "progress=false"]
    run_merge(compose("merge", common, output_dir=out))
    (out / "merge_report.json").unlink()  # as if killed after model/ was renamed into place
    _one_line_error(lambda: run_merge(compose("merge", common, output_dir=out)), "interrupted.*set overwrite=true")
    run_merge(compose("merge", [*common, "overwrite=true"], output_dir=out))
    assert (out / "merge_report.json").exists()


def test_pickle_only_dirs_in_streaming_stages_get_the_conversion_not_allow_pickle(compose, tiny_llama_dir, tmp_path):
    from spear.analysis.stage import run_analyze

    pickled = tmp_path / "pickled"
    shutil.copytree(tiny_llama_dir, pickled)
    weights = load_file(pickled / "model.safetensors")
    (pickled / "model.safetensors").unlink()
    torch.save(weights, pickled / "pytorch_model.bin")
    cfg = compose("analyze", [f"base={tiny_llama_dir}", f"adapted={pickled}", "model.allow_pickle=true"],
                  output_dir=tmp_path / "run")
    message = _one_line_error(lambda: run_analyze(cfg), "adapted=.*holds no safetensors weights")
    assert "allow_pickle" not in message
