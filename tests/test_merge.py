"""Streaming and in-memory merges, the writer, the entry point, exports and bad input."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from spear.analysis.ranking import Unit
from spear.config.schema import SlerpMerge
from spear.errors import SpearError
from spear.io.reader import Checkpoint
from spear.io.writer import ShardedSafetensorsWriter, TensorSpec, parse_size, plan_shards
from spear.merging.plan import MergePlan, TMap
from spear.merging.streaming import layer_map_of_dir_config, merge_checkpoints

ROOT = Path(__file__).resolve().parents[1]


def tmap_of(layer_t=None, group_t=None, non_layer_t: float = 0.0) -> TMap:
    """A TMap from per-layer and per-(layer, group) strengths."""
    units = {Unit(layer): t for layer, t in (layer_t or {}).items()}
    units.update({Unit(*key): t for key, t in (group_t or {}).items()})
    return TMap(units, non_layer_t)


def merge(base, adapted, out, tmap, *, max_shard_size="2GB", **kwargs):
    return merge_checkpoints(base, adapted, out, tmap, SlerpMerge(max_shard_size=max_shard_size), **kwargs)


def perturb(src: Path, dst: Path, scale: float = 0.05, seed: int = 1) -> Path:
    """A deterministic "adapted" copy of ``src``: every float tensor + scale * std * noise."""
    shutil.copytree(src, dst)
    g = torch.Generator().manual_seed(seed)
    for f in dst.glob("*.safetensors"):
        tensors = load_file(f)
        for name, t in tensors.items():
            if t.is_floating_point():
                std = float(t.float().std()) if t.numel() > 1 else 1.0
                tensors[name] = (t.float() + scale * (std or 1.0) * torch.randn(t.shape, generator=g)).to(t.dtype)
        save_file(tensors, f, metadata={"format": "pt"})
    return dst


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    from spear.models.tiny import save_tiny

    root = tmp_path_factory.mktemp("pair")
    base = save_tiny("tiny_llama", root / "base")
    adapted = perturb(base, root / "adapted", scale=0.3)
    return base, adapted


def read_all(model_dir: Path) -> dict[str, torch.Tensor]:
    ck = Checkpoint(model_dir)
    return {n: ck.get(n) for n in ck.names}


def lmap_of(model_dir: Path):
    return layer_map_of_dir_config(json.loads((model_dir / "config.json").read_text()))


def test_t0_everywhere_is_the_adapted_model_and_t1_the_base(pair, tmp_path):
    base, adapted = pair
    merge(base, adapted, tmp_path / "t0", tmap_of({i: 0.0 for i in range(4)}), progress=False)
    merge(base, adapted, tmp_path / "t1", tmap_of({i: 1.0 for i in range(4)}, None, 1.0), progress=False)
    a, b = read_all(adapted), read_all(base)
    t0, t1 = read_all(tmp_path / "t0"), read_all(tmp_path / "t1")
    assert a and t0.keys() == a.keys() and t1.keys() == b.keys()  # every tensor written, none missing
    for name, tensor in t0.items():
        assert torch.equal(tensor, a[name]), name
    for name, tensor in t1.items():
        assert torch.equal(tensor, b[name]), name


def test_output_loads_is_finite_and_stays_tied(pair, tmp_path):
    from transformers import AutoModelForCausalLM

    base, adapted = pair
    out = tmp_path / "out"
    report = merge(base, adapted, out, tmap_of({0: 0.5, 2: 1.0}, None, 0.3), progress=False)
    assert {"config.json", "generation_config.json", "tokenizer.json", "model.safetensors"} <= {p.name for p in out.iterdir()}
    with safe_open(out / "model.safetensors", "pt") as fh:
        assert "lm_head.weight" not in fh.keys()  # tied: stored once, as in the inputs
    model = AutoModelForCausalLM.from_pretrained(out).eval()
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    ids = torch.arange(3, 40).unsqueeze(0)
    loss = model(input_ids=ids, labels=ids).loss
    assert torch.isfinite(loss)
    stats = report["tensors"]["model.layers.0.self_attn.q_proj.weight"]
    assert set(stats) == {"t", "cos", "angle", "rel_change", "fallback"} and stats["t"] == 0.5
    assert report["tensors"]["model.embed_tokens.weight"]["t"] == 0.3
    assert report["tensors"]["model.layers.1.mlp.up_proj.weight"]["t"] == 0.0
    assert report["bytes_read"] > 0 and report["bytes_written"] > 0 and report["peak_rss_bytes"] > 0


def test_untied_lm_head_stays_equal_to_embeddings(pair, tmp_path):
    base, adapted = pair
    dirs = []
    for src in (base, adapted):  # store lm_head explicitly (equal to the embeddings)
        dst = tmp_path / src.name
        shutil.copytree(src, dst)
        tensors = load_file(dst / "model.safetensors")
        tensors["lm_head.weight"] = tensors["model.embed_tokens.weight"].clone()
        save_file(tensors, dst / "model.safetensors", metadata={"format": "pt"})
        dirs.append(dst)
    merge(dirs[0], dirs[1], tmp_path / "out", tmap_of({}, None, 0.4), progress=False)
    out = read_all(tmp_path / "out")
    assert torch.equal(out["lm_head.weight"], out["model.embed_tokens.weight"])


def test_sharded_output_reads_back_identical(pair, tmp_path):
    base, adapted = pair
    tmap = tmap_of({0: 0.3, 1: 0.7, 3: 1.0})
    merge(base, adapted, tmp_path / "one", tmap, progress=False)
    rep = merge(base, adapted, tmp_path / "many", tmap, max_shard_size="40KB", progress=False)
    assert len(rep["files"]) > 3 and (tmp_path / "many" / "model.safetensors.index.json").exists()
    index = json.loads((tmp_path / "many" / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) == set(rep["files"])
    one, many = read_all(tmp_path / "one"), read_all(tmp_path / "many")
    assert one.keys() == many.keys()
    for name in one:
        assert torch.equal(one[name], many[name]), name
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(tmp_path / "many")


def test_writer_handles_dtypes_and_plans_shards(tmp_path):
    tensors = {
        "a": torch.randn(3, 5),
        "b": torch.randn(7).to(torch.bfloat16),
        "c": torch.arange(4, dtype=torch.int64),
        "d": torch.tensor(2.5, dtype=torch.float16),
        "e": torch.tensor([True, False]),
    }
    from spear.io.dtypes import torch_to_st_dtype

    specs = [TensorSpec(n, torch_to_st_dtype(t.dtype), tuple(t.shape)) for n, t in tensors.items()]
    with ShardedSafetensorsWriter(tmp_path / "w", specs, 64) as w:
        for n, t in tensors.items():
            w.write(n, t)
    back = read_all(tmp_path / "w")
    for n, t in tensors.items():
        assert back[n].dtype == t.dtype and torch.equal(back[n], t), n
    from spear.io.hashing import file_sha256

    digests = w.summary()["sha256"]  # hashed as written: what the model card records without re-reading
    assert len(digests) == len(w.files) > 1 and digests == {f: file_sha256(tmp_path / "w" / f) for f in w.files}
    assert parse_size("2GB") == 2 * 10**9 and parse_size("1GiB") == 2**30 and parse_size(1000) == 1000
    with pytest.raises(SpearError, match="max_shard_size"):
        parse_size("lots")
    assert [len(s) for s in plan_shards([TensorSpec("x", "F32", (10,))] * 3, 50)] == [1, 1, 1]
    with pytest.raises(SpearError, match="expected tensor"):
        ShardedSafetensorsWriter(tmp_path / "x", specs, "1GB").write("b", tensors["b"])


def test_in_memory_merge_equals_streaming_merge(pair, tmp_path):
    from transformers import AutoModelForCausalLM

    from spear.merging.inmemory import InMemoryMerger

    base, adapted = pair
    tmap = tmap_of({0: 0.25, 1: 0.5, 3: 1.0}, {(0, "attn"): 0.1, (0, "mlp"): 0.4, (1, "attn"): 0.5, (1, "mlp"): 0.5}, 0.2)
    merge(base, adapted, tmp_path / "out", tmap, progress=False)
    streamed = read_all(tmp_path / "out")
    model = AutoModelForCausalLM.from_pretrained(adapted).eval()
    original = {n: p.detach().clone() for n, p in model.named_parameters()}
    merger = InMemoryMerger(model, base, SlerpMerge())
    merger.apply(tmap)
    for name, param in model.named_parameters():
        assert torch.equal(param, streamed[name]), name
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    merger.reset()
    for name, param in model.named_parameters():
        assert torch.equal(param, original[name]), name


def test_in_memory_merger_touches_only_changed_tensors(pair):
    from transformers import AutoModelForCausalLM

    from spear.merging.inmemory import InMemoryMerger

    base, adapted = pair
    model = AutoModelForCausalLM.from_pretrained(adapted).eval()
    base_t = read_all(base)
    merger = InMemoryMerger(model, base, SlerpMerge())
    per_layer = 9  # 7 matrices + 2 norms of a Llama layer
    first = merger.apply(tmap_of({2: 1.0}))
    assert len(first) == per_layer
    assert torch.equal(model.model.layers[2].mlp.down_proj.weight, base_t["model.layers.2.mlp.down_proj.weight"])
    second = merger.apply(tmap_of({3: 1.0}))  # layer 2 back to adapted, layer 3 restored
    assert len(second) == 2 * per_layer
    assert merger.apply(tmap_of({3: 1.0})) == {}
    assert merger.current == tmap_of({3: 1.0})
    full = merger.apply(merger.base_tmap())
    for name, param in model.named_parameters():
        assert torch.equal(param, base_t[name]), name
    assert len(full) + per_layer == sum(1 for _ in model.named_parameters())
    with pytest.raises(SpearError, match="layers 0..3"):
        merger.apply(tmap_of({4: 1.0}))


def test_bad_input_different_architectures(tmp_path):
    from spear.models.tiny import save_tiny

    llama = save_tiny("tiny_llama", tmp_path / "llama")
    gemma = save_tiny("tiny_gemma", tmp_path / "gemma")
    with pytest.raises(SpearError, match="different architectures"):
        merge(llama, gemma, tmp_path / "out", tmap_of(), progress=False)
    assert not (tmp_path / "out").exists()


def test_bad_input_shape_mismatch_and_nan(pair, tmp_path):
    base, adapted = pair
    shape_bad = tmp_path / "shape"
    shutil.copytree(adapted, shape_bad)
    tensors = load_file(shape_bad / "model.safetensors")
    tensors["model.layers.1.mlp.up_proj.weight"] = tensors["model.layers.1.mlp.up_proj.weight"][:-1].clone()
    save_file(tensors, shape_bad / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(SpearError, match="shape"):
        merge(base, shape_bad, tmp_path / "o1", tmap_of(), progress=False)
    nan_bad = tmp_path / "nan"
    shutil.copytree(adapted, nan_bad)
    tensors = load_file(nan_bad / "model.safetensors")
    tensors["model.layers.3.self_attn.v_proj.weight"][0, 0] = float("nan")
    save_file(tensors, nan_bad / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(SpearError, match="NaN"):
        merge(base, nan_bad, tmp_path / "o2", tmap_of({3: 0.5}), progress=False)
    assert not (tmp_path / "o1").exists() and not (tmp_path / "o2").exists()
    assert not list(tmp_path.glob(".tmp-*"))


def test_bad_input_t_and_layers(pair, tmp_path):
    base, adapted = pair
    with pytest.raises(SpearError, match=r"\[0, 1\]"):
        merge(base, adapted, tmp_path / "o", tmap_of({0: 1.5}), progress=False)
    with pytest.raises(SpearError, match="layer 7"):
        merge(base, adapted, tmp_path / "o", tmap_of({7: 0.5}), progress=False)


def test_existing_output_needs_overwrite(pair, tmp_path):
    base, adapted = pair
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("user data")
    with pytest.raises(SpearError, match="overwrite=true"):
        merge(base, adapted, out, tmap_of(), progress=False)
    assert (out / "keep.txt").read_text() == "user data"
    merge(base, adapted, out, tmap_of(), overwrite=True, progress=False)
    assert not (out / "keep.txt").exists() and (out / "model.safetensors").exists()


def test_interrupted_merge_leaves_nothing_and_the_next_run_succeeds(pair, tmp_path):
    base, adapted = pair
    out = tmp_path / "out"
    seen = []

    def boom(name):
        seen.append(name)
        if len(seen) == 5:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        merge(base, adapted, out, tmap_of({1: 0.5}), max_shard_size="40KB", progress=False, on_tensor=boom)
    assert not out.exists() and not list(tmp_path.glob(".tmp-*"))
    merge(base, adapted, out, tmap_of({1: 0.5}), progress=False)
    assert (out / "model.safetensors").exists()


def test_killed_merge_process_leaves_no_output(pair, tmp_path):
    base, adapted = pair
    out = tmp_path / "out"
    marker = tmp_path / "started"
    code = f"""
import time
from pathlib import Path
from spear.config.schema import SlerpMerge
from spear.merging.plan import TMap
from spear.merging.streaming import merge_checkpoints
def slow(name):
    Path({str(marker)!r}).touch()
    time.sleep(0.2)
merge_checkpoints(Path({str(base)!r}), Path({str(adapted)!r}), Path({str(out)!r}), TMap.of_layers({{1: 0.5}}),
                  SlerpMerge(max_shard_size="40KB"), progress=False, on_tensor=slow)
"""
    proc = subprocess.Popen([sys.executable, "-c", code], cwd=ROOT)
    try:
        deadline = time.time() + 120
        while not marker.exists() and time.time() < deadline and proc.poll() is None:
            time.sleep(0.05)
        assert marker.exists(), "the merge subprocess never started writing"
        time.sleep(0.3)
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait()
    assert not out.exists()
    assert list(tmp_path.glob(".tmp-out-*"))  # the half-written temp dir, hidden
    merge(base, adapted, out, tmap_of({1: 0.5}), progress=False)
    assert (out / "model.safetensors").exists() and not list(tmp_path.glob(".tmp-out-*"))


# ------------------------------------------------------------------------- entry point


def write_ranking_n(path: Path, num_layers: int) -> Path:
    """A ranking with deterministic scrambled scores for ``num_layers`` layers."""
    scores = {layer: ((layer * 7) % num_layers) / (num_layers - 1) for layer in range(num_layers)}
    order = sorted(scores, key=lambda layer: (-scores[layer], layer))
    layers = [{"layer": lay, "score": s, "rank": order.index(lay) + 1, "metrics": {}, "modules": {}} for lay, s in scores.items()]
    path.write_text(json.dumps({"spear_version": "test", "impact": {"name": "test", "params": {}},
                                "num_layers": num_layers, "order": order, "layers": layers}))  # fmt: skip
    return path


def write_ranking(path: Path, num_layers: int = 4) -> Path:
    scores = {0: 0.2, 1: 0.9, 2: 0.5, 3: 0.7}
    order = sorted(scores, key=lambda layer: -scores[layer])
    doc = {
        "spear_version": "test",
        "impact": {"name": "combined", "params": {}},
        "base": {"path": "x"},
        "adapted": {"path": "y"},
        "num_layers": num_layers,
        "order": order,
        "layers": [
            {"layer": layer, "score": s, "rank": order.index(layer) + 1, "metrics": {}, "modules": {},
             "groups": {"attn": s, "mlp": s / 3}}
            for layer, s in scores.items()
        ],
    }  # fmt: skip
    path.write_text(json.dumps(doc))
    return path


def test_run_writes_model_report_and_mergekit_yaml(pair, tmp_path, compose):
    import yaml
    from transformers import AutoModelForCausalLM

    from spear.merging.stage import run_merge as run

    base, adapted = pair
    ranking = write_ranking(tmp_path / "ranking.json")
    cfg = compose("merge", [f"base={base}", f"adapted={adapted}", f"ranking={ranking}", "progress=false"])
    result = run(cfg)
    run_dir = Path(result["output_dir"])
    report = json.loads((run_dir / "merge_report.json").read_text())
    for key in ("policy", "method", "layer_t", "tensors", "bytes_read", "bytes_written", "seconds", "peak_rss_bytes"):
        assert key in report, key
    assert report["method"] == "slerp" and report["policy"]["name"] == "balanced"
    # balanced on scores 0.2 0.9 0.5 0.7: top 2 = layers 1 (t=1) and 3 (t=0.7/0.9)
    assert report["layer_t"] == pytest.approx({"0": 0.0, "1": 1.0, "2": 0.0, "3": 0.7 / 0.9})
    stats = report["tensors"]["model.layers.3.mlp.up_proj.weight"]
    assert set(stats) >= {"t", "cos", "angle", "rel_change", "fallback"}
    model = AutoModelForCausalLM.from_pretrained(run_dir / "model")
    ids = torch.arange(3, 30).unsqueeze(0)
    assert torch.isfinite(model(input_ids=ids, labels=ids).loss)
    mk = yaml.safe_load((run_dir / "mergekit.yaml").read_text())
    assert mk["merge_method"] == "slerp" and mk["base_model"] == str(adapted.resolve())
    assert mk["dtype"] == "float32"
    # existing output without overwrite -> error; with overwrite -> replaced
    with pytest.raises(SpearError, match="overwrite=true"):
        run(cfg)
    cfg2 = compose("merge", [f"base={base}", f"adapted={adapted}", "policy=uniform", "policy.t=1.0",
                             "policy.non_layer_t=1.0", "overwrite=true", "progress=false"])  # fmt: skip
    run(cfg2)
    b = read_all(base)
    for name, tensor in read_all(run_dir / "model").items():
        assert torch.equal(tensor, b[name]), name


def mergekit_value(setting, name: str, num_layers: int, layer: int | None) -> float:
    """mergekit's evaluate_setting of one parameter (first matching filter; gradient at layer/(n-1))."""
    if not isinstance(setting, list):
        return setting
    pos = 0.0 if layer is None else layer / (num_layers - 1)
    for entry in setting:
        if entry.get("filter") is None or entry["filter"] in name:
            value = entry["value"]
            if isinstance(value, list):
                scaled = pos * (len(value) - 1)
                i0 = int(scaled)
                i1 = min(len(value) - 1, i0 + 1)
                frac = scaled - i0
                return (1 - frac) * value[i0] + frac * value[i1]
            return value
    raise AssertionError(f"no value for {name}")


@pytest.mark.parametrize("group", [False, True])
def test_mergekit_export_gives_every_tensor_spears_t(pair, group):
    import yaml

    from spear.merging.exports import mergekit_config, mergekit_yaml

    base, adapted = pair
    tmap = tmap_of({0: 0.1, 1: 0.0, 2: 0.75, 3: 1.0}, {(0, "attn"): 0.2, (0, "mlp"): 0.0, (2, "attn"): 1.0, (2, "mlp"): 0.5} if group else None, 0.05)
    lmap = lmap_of(adapted)
    names = Checkpoint(adapted).names + ["lm_head.weight"]
    spear_t = {name: step.t for name, step in MergePlan.build(tmap, lmap, names, SlerpMerge()).steps.items()}
    assert len(set(spear_t.values())) >= 4  # the map really varies across tensors
    cfg = mergekit_config(tmap, base=str(base), adapted=str(adapted), num_layers=4)
    assert cfg["base_model"] == str(adapted) and [m["model"] for m in cfg["models"]] == [str(adapted), str(base)]
    for name in names:
        assert mergekit_value(cfg["parameters"]["t"], name, 4, lmap.layer_of(name)) == pytest.approx(spear_t[name], abs=1e-12), name
    assert yaml.safe_load(mergekit_yaml(cfg)) == cfg
    # the other kernels: weights (and densities) that give each tensor spear's t
    density = 0.3
    for kernel, method in (("linear", "linear"), ("task_arithmetic", "task_arithmetic"), ("ties", "ties"), ("dare", "dare_linear")):
        cfg = mergekit_config(tmap, base=str(base), adapted=str(adapted), num_layers=4, kernel=kernel,
                              kernel_params={"density": density})
        assert cfg["merge_method"] == method
        models = {m["model"]: m.get("parameters", {}) for m in cfg["models"]}
        for name in names:
            layer, t = lmap.layer_of(name), spear_t[name]
            assert mergekit_value(models[str(adapted)]["weight"], name, 4, layer) == pytest.approx(1 - t, abs=1e-12), (kernel, name)
            if kernel == "linear":
                assert mergekit_value(models[str(base)]["weight"], name, 4, layer) == pytest.approx(t, abs=1e-12)
            else:
                assert cfg["base_model"] == str(base) and str(base) not in models
            if kernel in ("ties", "dare"):
                expect = density if t > 0 else 1.0  # t=0 keeps the adapted tensor untrimmed
                assert mergekit_value(models[str(adapted)]["density"], name, 4, layer) == pytest.approx(expect), (kernel, name)


def test_run_without_ranking_ranks_with_the_analysis_code(pair, compose):
    from spear.merging.stage import run_merge as run

    base, adapted = pair
    cfg = compose("merge", [f"base={base}", f"adapted={adapted}", "policy=top_k", "policy.k=1", "progress=false"])
    result = run(cfg)
    run_dir = Path(result["output_dir"])
    ranking = json.loads((run_dir / "ranking.json").read_text())
    top = ranking["order"][0]
    assert result["layer_t"] == {str(i): (1.0 if i == top else 0.0) for i in range(4)}


def test_target_retention_searches_in_memory_then_writes(pair, tmp_path, compose):

    from spear.analysis.ranking import Ranking
    from spear.evaluation.proxy import ProxyEvaluator
    from spear.merging.inmemory import InMemoryMerger
    from spear.merging.policies import build_tmap
    from spear.merging.stage import run_merge as run
    from spear.models import load_model

    base, adapted = pair
    text = tmp_path / "general.txt"
    text.write_text("The quick brown fox jumps over the lazy dog. " * 40)
    ranking = write_ranking(tmp_path / "ranking.json")
    common = [f"base={base}", f"adapted={adapted}", f"ranking={ranking}", "policy=target_retention",
              f"proxy.general.source={text}", "proxy.general.max_tokens=256", "proxy.max_length=128", "proxy.stride=128",
              "progress=false"]  # fmt: skip
    cfg = compose("merge", [*common, "policy.metric=recovery", "policy.target=0.3"], output_dir=tmp_path / "a")
    result = run(cfg)
    search = result["search"]
    assert search["metric"] == "recovery" and search["nll_base"] != search["nll_adapted"]
    assert search["reached"] and search["value"] >= 0.3 and len(search["history"]) >= 3
    report = json.loads((tmp_path / "a" / "merge_report.json").read_text())
    assert report["search"]["scale"] == search["scale"]
    # the search found the smallest sufficient scale: one tolerance step less misses the target
    model, tokenizer = load_model(str(adapted))
    merger = InMemoryMerger(model, base, cfg.merge)
    full = build_tmap(Ranking.load(ranking), cfg.policy, 4)
    merger.apply(full.scaled(search["scale"] - cfg.policy.tol))
    nll = ProxyEvaluator(tokenizer, cfg.proxy, roles=("general",)).nll(model)["general"]
    recovery = (search["nll_adapted"] - nll) / (search["nll_adapted"] - search["nll_base"])
    assert recovery < 0.3
    assert report["layer_t"] == {str(k): v for k, v in full.scaled(search["scale"]).layer_t.items()}
    unreachable = run(compose("merge", [*common, "policy.target=5.0"], output_dir=tmp_path / "b"))
    assert unreachable["search"]["reached"] is False and unreachable["search"]["scale"] == 1.0


def test_cli_error_is_one_line(pair, tmp_path):
    base, _ = pair
    proc = subprocess.run(
        [sys.executable, "-m", "spear.merge", f"base={base}", f"adapted={tmp_path / 'missing'}",
         f"hydra.run.dir={tmp_path / 'run'}", "logger=none"],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith("error:")
    assert "Traceback" not in proc.stderr


def test_a_merged_model_carries_its_model_card(pair, tmp_path, compose):
    """model/README.md: hub front matter, the restoration table of the report, the weights' digests, the config."""
    from spear.io.hashing import file_sha256
    from spear.merging.stage import run_merge
    from spear.models.card import front_matter

    base, adapted = pair
    (base / "README.md").write_text("---\nlicense: apache-2.0\n---\n# the base\n")
    try:
        cfg = compose("merge", [f"base={base}", f"adapted={adapted}", f"ranking={write_ranking(tmp_path / 'r.json')}",
                                "progress=false"])
        run_dir = Path(run_merge(cfg)["output_dir"])
    finally:
        (base / "README.md").unlink()
    card = (run_dir / "model" / "README.md").read_text()
    meta = front_matter(run_dir / "model" / "README.md")
    assert meta == {"base_model": str(base.resolve()), "library_name": "transformers", "tags": ["spear-mm", "merge"],
                    "license": "apache-2.0"}
    report = json.loads((run_dir / "merge_report.json").read_text())
    assert report["card"] == "model/README.md"
    for layer, t in report["layer_t"].items():
        assert f"| {layer} | {t:.3f} |" in card
    assert file_sha256(run_dir / "model" / "model.safetensors") in card
    assert file_sha256(adapted / "model.safetensors") in card and file_sha256(base / "model.safetensors") in card
    assert "policy: `balanced`" in card and "\n  name: balanced\n" in card  # the table and the saved config
