"""spear.analyze on the embedded SmolLM2-135M (slow: real weights, ~1 GB of tensors read)."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.slow

DRIFTED = (5, 17, 26)


@pytest.fixture(scope="module")
def smollm2_dir() -> Path:
    from spear.errors import SpearError
    from spear.models import resolve_model_dir

    try:
        return resolve_model_dir("smollm2_135m")
    except SpearError as err:
        pytest.skip(str(err))


@pytest.fixture(scope="module")
def drifted(smollm2_dir, tmp_path_factory) -> Path:
    """SmolLM2 with DRIFTED layers shrunk and pushed off (CPT-like damage), tiny drift elsewhere."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    out = tmp_path_factory.mktemp("drifted") / "model"
    out.mkdir()
    for f in smollm2_dir.iterdir():
        if f.is_file() and not f.name.endswith(".safetensors"):
            shutil.copy(f, out / f.name)
    layer_re = re.compile(r"layers\.(\d+)\..*proj\.weight$")
    gen = torch.Generator().manual_seed(0)
    for f in sorted(smollm2_dir.glob("*.safetensors")):
        tensors = {}
        with safe_open(str(f), "pt") as h:
            for name in h.keys():
                t = h.get_tensor(name)
                m = layer_re.search(name)
                if m:
                    scale = float(t.std())
                    hit = int(m.group(1)) in DRIFTED
                    t = (0.85 if hit else 1.0) * t + (0.2 if hit else 0.005) * scale * torch.randn(t.shape, generator=gen)
                tensors[name] = t.contiguous()
        save_file(tensors, str(out / f.name), metadata={"format": "pt"})
    return out


def test_smollm2_drifted_layers_rank_first(compose, smollm2_dir, drifted, tmp_path):
    from spear.analysis.stage import run_analyze as run

    cfg = compose("analyze", [f"adapted={drifted}", "progress=false"], output_dir=tmp_path / "run")
    result = run(cfg)
    ranking = json.loads(Path(result["ranking_path"]).read_text())
    assert ranking["num_layers"] == 30
    assert set(ranking["order"][:3]) == set(DRIFTED), ranking["order"]


def quiet_tail(t: torch.Tensor, f: float, keep: float = 0.2) -> torch.Tensor:
    """``t`` with its top ``keep`` fraction of singular values kept, the rest scaled by ``f``.

    Raises its Spectrum ``snr`` at least ``1 + (1 - f) k / (f r)`` times (``k`` kept of ``r``); see
    ``test_analysis.quiet_tail``.
    """
    u, s, vh = torch.linalg.svd(t.to(torch.float64), full_matrices=False)
    k = int(keep * s.numel())
    s = torch.cat([s[:k], f * s[k:]])
    return ((u * s) @ vh).to(t.dtype)


# layer -> tail scale. SmolLM2's own Spectrum SNRs spread widely (one v_proj is 13x the next), so
# the planted layers need not top every module type: topping the other six is enough to rank first.
SNR_PLANTED = {20: 0.005, 7: 0.03}


def test_smollm2_spectrum_snr_ranking(smollm2_dir, tmp_path):
    """Layers given quiet tails outrank SmolLM2's own; only their tensors are written, the rest is linked."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    from spear.analysis.scoring import spectrum_snr_ranking

    planted = tmp_path / "planted"
    planted.mkdir()
    shutil.copy(smollm2_dir / "config.json", planted / "config.json")
    layer_re = re.compile(r"layers\.(\d+)\.(self_attn|mlp)\.\w+_proj\.weight$")
    weight_map, tensors = {}, {}
    for f in sorted(smollm2_dir.glob("*.safetensors")):
        (planted / f.name).symlink_to(f)
        with safe_open(str(f), "pt") as h:
            for name in h.keys():
                m = layer_re.search(name)
                if m and int(m.group(1)) in SNR_PLANTED:
                    tensors[name] = quiet_tail(h.get_tensor(name), SNR_PLANTED[int(m.group(1))]).contiguous()
                weight_map[name] = "planted.safetensors" if name in tensors else f.name
    assert len(tensors) == 7 * len(SNR_PLANTED)
    save_file(tensors, str(planted / "planted.safetensors"), metadata={"format": "pt"})
    (planted / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    order = spectrum_snr_ranking(planted)
    assert order[:2] == [20, 7] and sorted(order) == list(range(30)), order


def test_smollm2_posterior_smoke(compose, drifted, tmp_path):
    from spear.analysis.stage import run_analyze as run

    cfg = compose(
        "analyze",
        [f"adapted={drifted}", "progress=false", "impact=posterior", "proxy.general.max_tokens=256",
         "proxy.domain.max_tokens=256", "proxy.max_length=256", "proxy.stride=256", "impact.calibration_tokens=256"],
        output_dir=tmp_path / "post",
    )
    ranking = json.loads(Path(run(cfg)["ranking_path"]).read_text())
    assert len(ranking["layers"]) == 30 and all("posterior" in lay for lay in ranking["layers"])
    assert {"rel_change", "sv_shift", "impact:combined"} <= set(ranking["proxy_vs_posterior"])
