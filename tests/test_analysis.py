"""spear.analyze end to end on tiny_llama pairs with known perturbations; reader; bad inputs."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from spear.errors import SpearError

PERTURBED = (1, 3)  # layers of the tiny_llama pair whose weights lost most of their signal


def write_model(src: Path, dest: Path, transform: Callable[[str, torch.Tensor], torch.Tensor] | None = None, shards: int = 1) -> Path:
    """Copy an HF dir, transforming its tensors; ``shards > 1`` writes a sharded checkpoint + index."""
    from safetensors.torch import load_file, save_file

    dest.mkdir(parents=True)
    for f in src.iterdir():
        if f.is_file() and not f.name.endswith(".safetensors") and f.name != "model.safetensors.index.json":
            shutil.copy(f, dest / f.name)
    tensors = {}
    for f in sorted(src.glob("*.safetensors")):
        tensors.update(load_file(str(f)))
    if transform:
        tensors = {n: transform(n, t).contiguous() for n, t in tensors.items()}
    names = sorted(tensors)
    if shards == 1:
        save_file(tensors, str(dest / "model.safetensors"), metadata={"format": "pt"})
        return dest
    weight_map = {}
    for i in range(shards):
        fname = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        part = {n: tensors[n] for n in names[i::shards]}
        save_file(part, str(dest / fname), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(part, fname))
    (dest / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return dest


_LAYER = re.compile(r"layers\.(\d+)\.(self_attn|mlp)\.\w+\.weight$")


def _signal(name: str, shape, rank: int = 4) -> torch.Tensor:
    """A deterministic rank-4 'learned structure' well above tiny_llama's random-init noise."""
    g = torch.Generator().manual_seed(sum(name.encode()) * 31 + len(name))
    u, _ = torch.linalg.qr(torch.randn(shape[0], rank, generator=g))
    v, _ = torch.linalg.qr(torch.randn(shape[1], rank, generator=g))
    return u @ torch.diag(torch.linspace(1.0, 2.0, rank)) @ v.T


def _noise(name: str, t: torch.Tensor, scale: float) -> torch.Tensor:
    g = torch.Generator().manual_seed(sum(name.encode()) + 7)
    return scale * float(t.std()) * torch.randn(t.shape, generator=g)


def _base_transform(name, t):
    return t + _signal(name, t.shape) if _LAYER.search(name) else t


def _adapted_transform(name, t):
    m = _LAYER.search(name)
    if not m:
        return t
    base = _base_transform(name, t)
    if int(m.group(1)) in PERTURBED:
        return base - 0.6 * _signal(name, t.shape) + _noise(name, t, 0.3)
    return base + _noise(name, t, 0.02)


@pytest.fixture(scope="module")
def pair(tiny_llama_dir, tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("pair")
    base = write_model(tiny_llama_dir, root / "base", _base_transform)
    adapted = write_model(tiny_llama_dir, root / "adapted", _adapted_transform)
    return base, adapted


def _run(compose, base, adapted, out: Path, *overrides):
    from spear.analysis.stage import run_analyze as run

    cfg = compose("analyze", [f"base={base}", f"adapted={adapted}", "progress=false", *overrides], output_dir=out)
    return run(cfg)


@pytest.mark.parametrize("impact", ["combined", "swci", "svdr", "rel_change", "sv_shift"])
def test_perturbed_layers_rank_first(compose, pair, tmp_path, impact):
    result = _run(compose, *pair, tmp_path / impact, f"impact={impact}")
    ranking = json.loads(Path(result["ranking_path"]).read_text())
    assert set(ranking["order"][: len(PERTURBED)]) == set(PERTURBED), ranking["order"]
    assert ranking["impact"]["name"] == impact
    for g in ("attn", "mlp"):
        assert set(ranking["group_order"][g][:2]) == set(PERTURBED)


def test_outputs_follow_the_contract(compose, pair, tmp_path):
    result = _run(compose, *pair, tmp_path / "run", "unfrozen_k=2")
    out = Path(result["output_dir"])
    ranking = json.loads((out / "ranking.json").read_text())
    assert {"spear_version", "impact", "base", "adapted", "num_layers", "order", "layers"} <= set(ranking)
    assert ranking["base"]["path"] == str(pair[0].resolve())
    assert ranking["num_layers"] == 4 and sorted(ranking["order"]) == [0, 1, 2, 3]
    params = ranking["impact"]["params"]
    assert params["components"] == {"rel_change": 1.0}
    assert params["metric_versions"]["snr_gd"] and params["spectra_method"] in ("svd", "gram", "gram64")
    layer = ranking["layers"][PERTURBED[0]]
    assert layer["rank"] in (1, 2) and {"swci", "svdr", "rel_change", "snr_base"} <= set(layer["metrics"])
    assert set(layer["groups"]) == {"attn", "mlp"}
    assert len(layer["modules"]) == 7 and "snr_gd_base" in layer["modules"]["self_attn.q_proj"]
    header = (out / "metrics.csv").read_text().splitlines()[0].split(",")
    assert header[:3] == ["name", "layer", "module"]
    assert {"snr_base", "snr_adapted", "snr_gd_base", "snr_gd_adapted", "rel_change", "svdr", "sv_shift", "swci"} <= set(header)
    assert len((out / "metrics.csv").read_text().splitlines()) == 1 + 4 * 7
    assert (out / "layer_scores.png").stat().st_size > 1000
    timing = json.loads((out / "timing.json").read_text())
    assert timing["matrices"] == 28 and timing["peak_rss_bytes"] > 0
    # the freeze exports round-trip: each one's trainable set on the model is what spear.train would train
    import yaml
    from transformers import AutoModelForCausalLM

    from spear.config.schema import FreezeConfig
    from spear.cpt.freeze import plan_for_model
    from spear.models import layer_map_for

    model = AutoModelForCausalLM.from_pretrained(str(pair[0]))
    names = [n for n, _ in model.named_parameters()]
    spear_plan = plan_for_model(FreezeConfig(mode="ranked", k=2), model, layer_map_for(model.config),
                                ranking=ranking["order"])
    assert set(spear_plan.frozen_layers) == set(PERTURBED)
    regexes = yaml.safe_load((out / "unfrozen_parameters.yaml").read_text())["unfrozen_parameters"]
    assert all(r.startswith("^") and r.endswith("$") for r in regexes)
    assert {n for n in names if any(re.match(rx, n) for rx in regexes)} == set(spear_plan.trainable_params)
    listed = (out / "trainable_parameters.txt").read_text().split()
    for name, param in model.named_parameters():
        param.requires_grad_(name in listed)
    assert {n for n, p in model.named_parameters() if p.requires_grad} == set(spear_plan.trainable_params)


def test_same_inputs_give_bit_identical_ranking(compose, pair, tmp_path):
    a = _run(compose, *pair, tmp_path / "a")
    b = _run(compose, *pair, tmp_path / "b")
    assert Path(a["ranking_path"]).read_bytes() == Path(b["ranking_path"]).read_bytes()
    assert Path(a["metrics_csv"]).read_bytes() == Path(b["metrics_csv"]).read_bytes()


def test_spectra_methods_give_the_same_ranking(compose, pair, tmp_path):
    orders = [_run(compose, *pair, tmp_path / m, f"spectra.method={m}", "spectra.batch_mb=0.01")["order"] for m in ("svd", "gram")]
    assert orders[0] == orders[1]


def test_identical_models_are_valid_input(compose, tiny_llama_dir, tmp_path):
    result = _run(compose, tiny_llama_dir, tiny_llama_dir, tmp_path / "same")
    ranking = json.loads(Path(result["ranking_path"]).read_text())
    assert ranking["order"] == [0, 1, 2, 3]  # all tied: broken by layer index
    for layer in ranking["layers"]:
        for values in layer["modules"].values():
            assert values["rel_change"] == values["svdr"] == values["sv_shift"] == values["swci"] == 0.0


def test_sharded_checkpoint_reads_like_single_file(pair, tmp_path):
    from spear.io.reader import Checkpoint, TensorPairReader

    base, adapted = pair
    sharded = write_model(base, tmp_path / "sharded", shards=3)
    assert len(list(sharded.glob("*.safetensors"))) == 3
    single, multi = Checkpoint(base), Checkpoint(sharded)
    assert single.names == multi.names
    assert len(set(multi.file_of.values())) == 3
    for name in single.names:
        assert torch.equal(single.get(name), multi.get(name))
    reader = TensorPairReader(sharded, adapted)
    names = [n for n in reader.names if "layers.0." in n and n.endswith("proj.weight")]
    plan = reader.plan_batches(names, max_bytes=1 << 30)
    assert sorted(n for b in plan for n in b) == sorted(names)
    for batch in plan:
        assert len({reader.base.shape(n) for n in batch}) == 1  # one shape per batch
        pb = reader.read_batch(batch)
        for i, n in enumerate(pb.names):
            assert torch.equal(pb.base[i], single.get(n)) and torch.equal(pb.adapted[i], Checkpoint(adapted).get(n))
    small = reader.plan_batches(names, max_bytes=1)
    assert all(len(b) == 1 for b in small)


def test_sharded_pair_gives_the_same_ranking(compose, pair, tmp_path):
    sharded = write_model(pair[1], tmp_path / "adapted_sharded", shards=2)
    a = _run(compose, pair[0], pair[1], tmp_path / "single")
    b = _run(compose, pair[0], sharded, tmp_path / "sharded_run")
    ra, rb = (json.loads(Path(r["ranking_path"]).read_text()) for r in (a, b))
    assert ra["layers"] == rb["layers"] and ra["order"] == rb["order"]


def quiet_tail(t: torch.Tensor, f: float, keep: float = 0.2) -> torch.Tensor:
    """``t`` with its top ``k = keep * r`` singular values kept and the other ``r - k`` scaled by ``f``.

    With ``k < r/4`` both quartiles lie in the tail, so Spectrum's threshold scales by ``f`` with it
    and the tail's split above/below is unchanged: the original's ``snr = (S_k + A) / (B s0)`` (SPEC
    §1.2) becomes ``(S_k + f A) / (f B s0)``, at least ``1 + (1 - f) k / (f r)`` times higher
    (``S_k >= k/r`` of the sum above): 19x for ``f = 0.01``, 2.7x for ``f = 0.1``.
    """
    u, s, vh = torch.linalg.svd(t.to(torch.float64), full_matrices=False)
    k = int(keep * s.numel())
    s = torch.cat([s[:k], f * s[k:]])
    return ((u * s) @ vh).to(t.dtype)


SNR_PLANTED = {2: 0.01, 1: 0.1}  # layer -> tail scale: layer 2 gets the clearly higher Spectrum SNR


def test_spectrum_snr_ranking(tiny_llama_dir, tmp_path):
    from spear.analysis.scoring import spectrum_snr_ranking

    def plant(name: str, t: torch.Tensor) -> torch.Tensor:
        m = _LAYER.search(name)
        return quiet_tail(t, SNR_PLANTED[int(m.group(1))]) if m and int(m.group(1)) in SNR_PLANTED else t

    planted = write_model(tiny_llama_dir, tmp_path / "planted", plant)
    order = spectrum_snr_ranking(planted)
    assert order[:2] == [2, 1] and sorted(order) == [0, 1, 2, 3], order
    assert order == spectrum_snr_ranking(planted)


def test_different_architectures_are_refused(compose, tmp_path):
    from spear.models import resolve_model_dir

    with pytest.raises(SpearError, match="different architectures"):
        _run(compose, resolve_model_dir("tiny_llama"), resolve_model_dir("tiny_gemma"), tmp_path / "x")


def test_truncated_file_is_refused(compose, tiny_llama_dir, tmp_path):
    bad = write_model(tiny_llama_dir, tmp_path / "truncated")
    f = bad / "model.safetensors"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    with pytest.raises(SpearError, match="truncated"):
        _run(compose, tiny_llama_dir, bad, tmp_path / "x")


def test_nan_is_refused(compose, tiny_llama_dir, tmp_path):
    def poison(name, t):
        if name == "model.layers.2.mlp.up_proj.weight":
            t = t.clone()
            t[0, 0] = float("nan")
        return t

    bad = write_model(tiny_llama_dir, tmp_path / "nan", poison)
    with pytest.raises(SpearError, match=r"model\.layers\.2\.mlp\.up_proj\.weight.*NaN"):
        _run(compose, tiny_llama_dir, bad, tmp_path / "x")


def test_bad_config_values_are_refused(compose, pair, tmp_path):
    with pytest.raises(SpearError, match="impact.components"):
        _run(compose, *pair, tmp_path / "x", "+impact.components.nope=1.0")
    with pytest.raises(SpearError, match="spectra.method"):
        _run(compose, *pair, tmp_path / "y", "spectra.method=qr")


def test_cli_missing_adapted_is_a_one_line_error(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "spear.analyze", "logger=none", f"hydra.run.dir={tmp_path / 'cli'}"],
        capture_output=True, text=True, cwd=Path(__file__).resolve().parents[1], timeout=120,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1].startswith("error: adapted is required")
    assert not (tmp_path / "cli").exists()


# ---- posterior impact (SPEC §1.4) -------------------------------------------------------------
GENERAL = " ".join(
    f"The {a} {b} of the {c} was {d} in the year {1900 + i}."
    for i, (a, b, c, d) in enumerate(
        (a, b, c, d)
        for a in ("old", "small", "famous", "northern")
        for b in ("river", "city", "castle", "library")
        for c in ("kingdom", "valley", "island")
        for d in ("built", "rebuilt", "described", "visited")
    )
)
DOMAIN = " ".join(f"Account {i} records a debit of {i * 7} dollars and a credit of {i * 3} dollars." for i in range(120))
HURT = (1, 3)  # layers the adapted model breaks (large noise): restoring them recovers the loss


@pytest.fixture(scope="module")
def trained_pair(tiny_llama_dir, tmp_path_factory):
    """A tiny_llama trained a little on GENERAL (so NLL means something), and a copy with HURT broken."""
    from transformers import AutoModelForCausalLM

    from spear.models.tiny import byte_tokenizer

    root = tmp_path_factory.mktemp("trained")
    tok = byte_tokenizer()
    ids = torch.tensor(tok(GENERAL + " " + DOMAIN, add_special_tokens=False)["input_ids"])
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(str(tiny_llama_dir), dtype=torch.float32)
    model.train()
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    gen = torch.Generator().manual_seed(0)
    for _ in range(40):
        starts = torch.randint(0, ids.numel() - 129, (8,), generator=gen)
        batch = torch.stack([ids[s : s + 128] for s in starts])
        loss = model(input_ids=batch, labels=batch).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    base = root / "base"
    model.save_pretrained(base)
    tok.save_pretrained(base)

    def hurt(name, t):
        m = _LAYER.search(name)
        if not m:
            return t
        return t + _noise(name, t, 5.0 if int(m.group(1)) in HURT else 0.01)

    adapted = write_model(base, root / "adapted", hurt)
    (root / "general.txt").write_text(GENERAL)
    (root / "domain.txt").write_text(DOMAIN)
    return base, adapted, root / "general.txt", root / "domain.txt"


def test_posterior_ranks_the_layers_whose_restoration_helps(compose, trained_pair, tmp_path):
    base, adapted, general, domain = trained_pair
    result = _run(
        compose, base, adapted, tmp_path / "post", "impact=posterior",
        f"proxy.general.source={general}", f"proxy.domain.source={domain}", "proxy.general.max_tokens=768",
        "proxy.domain.max_tokens=768", "proxy.max_length=128", "proxy.stride=128", "impact.groups=true",
    )
    ranking = json.loads(Path(result["ranking_path"]).read_text())
    assert ranking["impact"]["name"] == "posterior"
    assert set(ranking["order"][:2]) == set(HURT), ranking["order"]
    for layer in ranking["layers"]:
        post = layer["posterior"]
        assert {"general_nll", "domain_nll", "general_recovery", "domain_change"} <= set(post)
        assert layer["score"] == post["score"]
    assert all(ranking["layers"][i]["posterior"]["general_recovery"] > 0 for i in HURT)
    # measured per group too: the most helpful attn and mlp restorations are in the broken layers
    assert ranking["group_order"]["attn"][0] in HURT and ranking["group_order"]["mlp"][0] in HURT
    corr = ranking["proxy_vs_posterior"]
    assert corr["rel_change"] is not None and corr["rel_change"] > 0.5
    assert "impact:combined" in corr and "impact:random" in corr
    ref = ranking["posterior"]["reference"]
    assert ref["base"]["general"] < ref["adapted"]["general"]


def test_control_and_snr_impacts_run(compose, pair, tmp_path):
    orders = {}
    for impact in ("random", "position", "snr"):
        result = _run(compose, *pair, tmp_path / impact, f"impact={impact}")
        ranking = json.loads(Path(result["ranking_path"]).read_text())
        assert sorted(ranking["order"]) == [0, 1, 2, 3] and ranking["impact"]["params"]["components"] == {
            {"random": "random", "position": "position", "snr": "snr_base"}[impact]: 1.0
        }
        orders[impact] = ranking["order"]
    assert orders["position"][:2] == [0, 3]  # edges first


# ---- gradient attribution (impact=grad_delta) -------------------------------------------------
def test_grad_delta_is_the_first_order_change_of_the_loss(trained_pair):
    """g_l = grad L . (base - adapted) over layer l equals the measured slope of L along that direction."""
    from transformers import AutoModelForCausalLM

    from spear.analysis.gradient import unit_directional_derivatives
    from spear.evaluation.scored import ScoredText
    from spear.io.reader import Checkpoint
    from spear.models import layer_map_for
    from spear.models.tiny import byte_tokenizer

    base, adapted, general, _ = trained_pair
    model = AutoModelForCausalLM.from_pretrained(str(adapted), dtype=torch.float32).eval()
    lmap = layer_map_for(model.config)
    ids = torch.tensor(byte_tokenizer()(general.read_text()[:600], add_special_tokens=False)["input_ids"])
    g = unit_directional_derivatives(model, base, {"general": ScoredText.of_text(ids)}, 128, lmap)["general"]
    base_ckpt = Checkpoint(base)

    def loss() -> float:
        with torch.no_grad():
            windows = [ids[i:i + 128] for i in range(0, ids.numel() - 1, 128)]
            windows = [w for w in windows if w.numel() >= 2]
            total = sum(w.numel() - 1 for w in windows)
            return sum(float(torch.nn.functional.cross_entropy(model(input_ids=w[None]).logits[0, :-1], w[1:],
                                                               reduction="sum")) for w in windows) / total

    params = dict(model.named_parameters())
    for layer in (0, 1, 3):
        names = [n for n in params if lmap.layer_of(n) == layer]
        original = {n: params[n].detach().clone() for n in names}
        delta = {n: base_ckpt.get(n).float() - original[n] for n in names}
        eps = 1e-3
        values = []
        for sign in (1, -1):
            with torch.no_grad():
                for n in names:
                    params[n].copy_(original[n] + sign * eps * delta[n])
            values.append(loss())
        with torch.no_grad():
            for n in names:
                params[n].copy_(original[n])
        slope = (values[0] - values[1]) / (2 * eps)
        assert g["layer"][layer] == pytest.approx(slope, rel=0.05, abs=1e-4), layer
        assert abs(slope) > 1e-3  # the direction really changes the loss: the check has something to match


def test_grad_delta_ranks_the_broken_layers_first_on_slices_after_the_evaluated_ones(compose, trained_pair, tmp_path):
    base, adapted, general, domain = trained_pair
    result = _run(
        compose, base, adapted, tmp_path / "grad", "impact=grad_delta", "impact.calibration_tokens=512",
        f"proxy.general.source={general}", f"proxy.domain.source={domain}", "proxy.general.max_tokens=256",
        "proxy.domain.max_tokens=256", "proxy.max_length=128", "proxy.stride=128",
    )
    ranking = json.loads(Path(result["ranking_path"]).read_text())
    assert ranking["impact"]["name"] == "grad_delta"
    assert set(ranking["order"][:2]) == set(HURT), ranking["order"]
    calibration = ranking["grad_delta"]["calibration"]
    assert calibration["general"]["part"] == "calibration" and calibration["general"]["tokens"] == 511  # scored
    assert all(layer["grad_delta"]["general_recovery"] > 0 for layer in ranking["layers"] if layer["layer"] in HURT)
    assert "rel_change" in ranking["proxy_vs_grad_delta"]
