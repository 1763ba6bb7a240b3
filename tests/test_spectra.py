"""Spectral math (spear.analysis.spectra): synthetic matrices with known structure."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from spear.analysis import spectra

# (n, p) with aspect ratios beta = 1, ~0.33 and 0.27, in both orientations
SHAPES = [(240, 240), (100, 300), (300, 100), (81, 300), (300, 81)]


def low_rank_plus_noise(n: int, p: int, k: int, seed: int, strength: float = 4.0) -> torch.Tensor:
    """Rank-k signal with singular values well above the noise bulk edge, plus Gaussian noise."""
    g = torch.Generator().manual_seed(seed)
    sigma = 1.0 / math.sqrt(max(n, p))  # noise singular values spread up to ~(1 + sqrt(beta))
    u, _ = torch.linalg.qr(torch.randn(n, k, generator=g, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(p, k, generator=g, dtype=torch.float64))
    edge = 1 + math.sqrt(min(n, p) / max(n, p))
    s = torch.linspace(strength * edge, 2 * strength * edge, k, dtype=torch.float64)
    noise = sigma * torch.randn(n, p, generator=g, dtype=torch.float64)
    return (u @ torch.diag(s) @ v.T + noise).to(torch.float32)


def spectrum_snr_reference(w: np.ndarray) -> float:
    """The published Spectrum formula, written out directly with numpy and a loop."""
    s = np.linalg.svd(w.astype(np.float64), compute_uv=False)
    n, m = w.shape
    beta = min(n, m) / max(n, m)
    iqr = np.percentile(s, 75) - np.percentile(s, 25)
    sigma = iqr / 1.349
    eps = sigma * (1 + math.sqrt(beta))
    signal = noise = 0.0
    for value in s:
        if value > eps:
            signal += value
        else:
            noise += value
    if noise == 0:
        noise = 1.0
    return (signal / noise) / s[0]


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("k", [1, 5, 12])
def test_snr_gd_recovers_rank(shape, k):
    n, p = shape
    w = low_rank_plus_noise(n, p, k, seed=k * 1000 + n + p)
    s = spectra.singular_values(w)
    beta = spectra.aspect_ratio(n, p)
    assert int(spectra.signal_rank(s, beta)) == k
    assert float(spectra.snr_gd(s, beta)) > 0.0


@pytest.mark.parametrize("shape", SHAPES)
def test_snr_gd_pure_noise_has_no_signal(shape):
    g = torch.Generator().manual_seed(7)
    w = torch.randn(*shape, generator=g)
    s = spectra.singular_values(w)
    beta = spectra.aspect_ratio(*shape)
    assert int(spectra.signal_rank(s, beta)) == 0
    assert float(spectra.snr_gd(s, beta)) == 0.0


def test_snr_gd_is_scale_free():
    w = low_rank_plus_noise(120, 200, 4, seed=3)
    beta = spectra.aspect_ratio(120, 200)
    a = float(spectra.snr_gd(spectra.singular_values(w), beta))
    b = float(spectra.snr_gd(spectra.singular_values(w * 37.0), beta))
    assert a == pytest.approx(b, rel=1e-4)


@pytest.mark.parametrize("shape", SHAPES + [(64, 64), (17, 40)])
@pytest.mark.parametrize("kind", ["noise", "low_rank"])
def test_snr_matches_published_spectrum_formula(shape, kind):
    n, p = shape
    if kind == "noise":
        w = torch.randn(n, p, generator=torch.Generator().manual_seed(n * p))
    else:
        w = low_rank_plus_noise(n, p, 3, seed=n + 2 * p)
    ours = float(spectra.spectrum_snr(torch.linalg.svdvals(w.double()).float(), spectra.aspect_ratio(n, p)))
    assert ours == pytest.approx(spectrum_snr_reference(w.numpy()), rel=1e-5)


def test_snr_noise_sum_zero_counts_as_one():
    # every singular value equal: IQR 0, eps 0, all values are "signal", noise sum 0 -> 1
    s = torch.full((10,), 2.0)
    assert float(spectra.spectrum_snr(s, 1.0)) == pytest.approx((20.0 / 1.0) / 2.0)


@pytest.mark.parametrize("shape", [(96, 96), (40, 120), (120, 40)])
def test_svdvals_and_gram_eigvalsh_agree(shape):
    w = low_rank_plus_noise(*shape, 6, seed=11)
    batch = torch.stack([w, 0.5 * w.flip(0), torch.randn(*shape, generator=torch.Generator().manual_seed(1))])
    ref = spectra.singular_values(batch, "svd")
    for method, tol in (("gram", 2e-3), ("gram64", 1e-5)):
        got = spectra.singular_values(batch, method)
        assert got.shape == ref.shape and got.dtype == torch.float32
        # absolute error relative to the largest singular value (Gram squares the condition number)
        assert torch.allclose(got, ref, atol=tol * float(ref.max()), rtol=0), method
    # metrics derived from either agree closely
    beta = spectra.aspect_ratio(*shape)
    g = spectra.singular_values(batch, "gram")
    assert torch.allclose(spectra.snr_gd(g, beta), spectra.snr_gd(ref, beta), rtol=1e-3)
    assert torch.allclose(spectra.spectrum_snr(g, beta), spectra.spectrum_snr(ref, beta), rtol=1e-3)


def test_batched_equals_single():
    mats = torch.randn(4, 30, 50, generator=torch.Generator().manual_seed(0))
    batched = spectra.singular_values(mats)
    for i in range(4):
        assert torch.allclose(batched[i], spectra.singular_values(mats[i]), atol=1e-5)
    beta = spectra.aspect_ratio(30, 50)
    snr = spectra.spectrum_snr(batched, beta)
    assert float(snr[2]) == pytest.approx(float(spectra.spectrum_snr(batched[2], beta)))


def test_change_metrics_on_known_changes():
    w = low_rank_plus_noise(60, 90, 4, seed=5)
    s = spectra.singular_values(w)
    beta = spectra.aspect_ratio(60, 90)
    # identical: every change metric is exactly 0
    assert float(spectra.sv_shift(s, s)) == 0.0
    assert float(spectra.sv_drop_ratio(s, s)) == 0.0
    assert float(spectra.erank_drop(s, s)) == 0.0
    assert float(spectra.rel_change(spectra.frobenius(w - w), spectra.frobenius(w))) == 0.0
    # uniform shrink by c: every singular value drops by (1 - c)
    c = 0.6
    sa = spectra.singular_values(c * w)
    assert float(spectra.sv_drop_ratio(s, sa)) == pytest.approx(1 - c, rel=1e-4)
    assert float(spectra.sv_drop_ratio(s, sa, spectra.signal_mask(s, beta))) == pytest.approx(1 - c, rel=1e-4)
    assert float(spectra.sv_shift(s, sa)) == pytest.approx(1 - c, rel=1e-4)
    assert float(spectra.rel_change(spectra.frobenius(c * w - w), spectra.frobenius(w))) == pytest.approx(1 - c, rel=1e-5)
    # growth moves the spectrum (sv_shift) but drops nothing (svdr)
    sg = spectra.singular_values(1.5 * w)
    assert float(spectra.sv_drop_ratio(s, sg)) == 0.0
    assert float(spectra.sv_shift(s, sg)) == pytest.approx(0.5, rel=1e-4)
    # removing the signal part: the signal-part svdr sees (almost) all of it, the whole-spectrum one less
    u, sv, vh = torch.linalg.svd(w.double(), full_matrices=False)
    sv_cut = sv.clone()
    sv_cut[:4] = sv[4]
    s_cut = spectra.singular_values((u @ torch.diag(sv_cut) @ vh).float())
    signal_part = float(spectra.sv_drop_ratio(s, s_cut, spectra.signal_mask(s, beta)))
    whole = float(spectra.sv_drop_ratio(s, s_cut))
    assert signal_part > 0.7 and whole < signal_part


def test_effective_rank():
    assert float(spectra.effective_rank(torch.ones(8))) == pytest.approx(8.0)
    assert float(spectra.effective_rank(torch.tensor([3.0, 0.0, 0.0]))) == pytest.approx(1.0)
    assert float(spectra.effective_rank(torch.zeros(5))) == 0.0


def test_zero_matrix_is_finite():
    s = spectra.singular_values(torch.zeros(20, 30))
    for value in (spectra.snr_gd(s, 2 / 3), spectra.spectrum_snr(s, 2 / 3), spectra.sv_shift(s, s), spectra.sv_drop_ratio(s, s)):
        assert math.isfinite(float(value))
