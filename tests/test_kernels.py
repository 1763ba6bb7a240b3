"""Merge kernels: exact ends, SLERP against a float64 reference, baselines, bad t."""

from __future__ import annotations

import math

import pytest
import torch

from spear.errors import SpearError
from spear.merging.kernels import CHUNK, KERNELS, merge_tensor, tensor_stats

PARAMS = {"slerp": {}, "linear": {}, "task_arithmetic": {}, "ties": {"density": 0.3}, "dare": {"density": 0.5, "seed": 1},
          "dg_hard": {"scope": "restored"}}


def _pair(shape=(48, 40), dtype=torch.float32, seed=0, drift=0.3):
    g = torch.Generator().manual_seed(seed)
    wb = torch.randn(shape, generator=g)
    wa = wb + drift * torch.randn(shape, generator=g)
    return wa.to(dtype), wb.to(dtype)


def slerp64(wa, wb, t):
    a, b = wa.double().flatten(), wb.double().flatten()
    cos = float(a @ b / (a.norm() * b.norm()))
    omega = math.acos(max(-1.0, min(1.0, cos)))
    s = math.sin(omega)
    return (math.sin((1 - t) * omega) / s * a + math.sin(t * omega) / s * b).reshape(wa.shape)


@pytest.mark.parametrize("kernel", sorted(KERNELS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_t0_is_adapted_and_t1_is_base_bit_exactly(kernel, dtype):
    wa, wb = _pair(dtype=dtype)
    out0, st0 = merge_tensor(kernel, wa, wb, 0.0, name="x", params=PARAMS[kernel])
    out1, st1 = merge_tensor(kernel, wa, wb, 1.0, name="x", params=PARAMS[kernel])
    assert out0.dtype == dtype and torch.equal(out0, wa)
    assert out1.dtype == dtype and torch.equal(out1, wb)
    assert st0["t"] == 0.0 and st1["t"] == 1.0 and not st0["fallback"]


def test_t1_casts_base_to_adapted_dtype():
    wa, wb = _pair()
    out, _ = merge_tensor("slerp", wa, wb.to(torch.bfloat16), 1.0)
    assert out.dtype == torch.float32 and torch.equal(out, wb.to(torch.bfloat16).float())


@pytest.mark.parametrize("shape", [(7,), (48, 40), (3 * CHUNK + 123,)])
@pytest.mark.parametrize("t", [0.5, 0.1, 0.9])
def test_slerp_matches_float64_reference(shape, t):
    wa, wb = _pair(shape, seed=len(shape), drift=0.8)
    out, st = merge_tensor("slerp", wa, wb, t)
    ref = slerp64(wa, wb, t)
    assert out.dtype == torch.float32 and not st["fallback"]
    assert torch.allclose(out.double(), ref, rtol=1e-5, atol=1e-6), (out.double() - ref).abs().max()
    a, b = wa.double().flatten(), wb.double().flatten()
    assert st["cos"] == pytest.approx(float(a @ b / (a.norm() * b.norm())), abs=1e-6)
    assert st["angle"] == pytest.approx(math.acos(st["cos"]), abs=1e-9)
    assert st["rel_change"] == pytest.approx(float((a - b).norm() / b.norm()), rel=1e-5)


def test_slerp_keeps_the_norm_of_equal_norm_tensors_and_differs_from_linear():
    wa, wb = _pair((64, 64), drift=2.0)
    wb = wb / wb.norm() * wa.norm()
    out, _ = merge_tensor("slerp", wa, wb, 0.5)
    lin, _ = merge_tensor("linear", wa, wb, 0.5)
    assert float(out.norm()) == pytest.approx(float(wa.norm()), rel=1e-5)
    assert float(lin.norm()) < 0.99 * float(wa.norm())


def test_slerp_falls_back_to_linear_only_when_sin_is_zero():
    wa, _ = _pair()
    out, st = merge_tensor("slerp", wa, wa.clone(), 0.3)  # parallel: angle 0
    assert st["fallback"] and torch.allclose(out, wa, rtol=1e-6, atol=1e-7)
    zero = torch.zeros_like(wa)
    out, st = merge_tensor("slerp", wa, zero, 0.25)  # zero tensor: no angle
    assert st["fallback"] and st["cos"] is None and torch.allclose(out, 0.75 * wa)
    out, st = merge_tensor("slerp", wa, -wa, 0.5)  # antipodal
    assert st["fallback"]
    wa2, wb2 = _pair(drift=0.01)  # nearly parallel: still real SLERP by default
    _, st = merge_tensor("slerp", wa2, wb2, 0.5)
    assert st["cos"] > 0.9995 and not st["fallback"]


def test_dot_threshold_reproduces_mergekits_lerp_rule():
    wa, wb = _pair(drift=0.01)
    out, st = merge_tensor("slerp", wa, wb, 0.4, params={"dot_threshold": 0.9995})
    lin, _ = merge_tensor("linear", wa, wb, 0.4)
    assert st["fallback"] and torch.equal(out, lin)
    wa, wb = _pair(drift=1.0)
    _, st = merge_tensor("slerp", wa, wb, 0.4, params={"dot_threshold": 0.9995})
    assert not st["fallback"]


def test_linear_and_task_arithmetic_formulas():
    wa, wb = _pair()
    t = 0.3
    lin, _ = merge_tensor("linear", wa, wb, t)
    ta, _ = merge_tensor("task_arithmetic", wa, wb, t)
    ref = (1 - t) * wa.double() + t * wb.double()
    assert torch.allclose(lin.double(), ref, atol=1e-6)
    assert torch.allclose(ta.double(), ref, atol=1e-6)


def test_ties_trims_the_delta_by_magnitude():
    wa, wb = _pair((100, 50))
    out, _ = merge_tensor("ties", wa, wb, 0.5, params={"density": 0.2})
    delta, kept = wa - wb, out - wb
    nonzero = kept.abs() > 0
    assert nonzero.float().mean().item() == pytest.approx(0.2, abs=0.002)
    assert delta.abs()[nonzero].min() >= delta.abs()[~nonzero].max()
    assert torch.allclose(kept[nonzero], 0.5 * delta[nonzero], atol=1e-6)


def test_dare_is_seeded_per_tensor_and_rescales():
    wa, wb = _pair((200, 100))
    params = {"density": 0.5, "seed": 3}
    a, _ = merge_tensor("dare", wa, wb, 0.5, name="w", params=params)
    b, _ = merge_tensor("dare", wa, wb, 0.5, name="w", params=params)
    c, _ = merge_tensor("dare", wa, wb, 0.5, name="other", params=params)
    assert torch.equal(a, b) and not torch.equal(a, c)
    kept = (a - wb).abs() > 0
    assert kept.float().mean().item() == pytest.approx(0.5, abs=0.02)
    assert torch.allclose((a - wb)[kept], ((wa - wb) * 0.5 / 0.5)[kept], atol=1e-5)
    with pytest.raises(SpearError, match="density"):
        merge_tensor("dare", wa, wb, 0.5, params={"density": 0.0})


@pytest.mark.parametrize("kernel", sorted(KERNELS))
def test_inputs_are_not_modified(kernel):
    wa, wb = _pair()
    wa0, wb0 = wa.clone(), wb.clone()
    merge_tensor(kernel, wa, wb, 0.4, name="n", params=PARAMS[kernel])
    assert torch.equal(wa, wa0) and torch.equal(wb, wb0)


@pytest.mark.parametrize("t", [-0.1, 1.5, float("nan"), "x"])
def test_t_outside_unit_interval_is_an_error(t):
    wa, wb = _pair()
    with pytest.raises(SpearError, match=r"outside \[0, 1\]|not a number"):
        merge_tensor("slerp", wa, wb, t)


def test_unknown_kernel_and_shape_mismatch():
    wa, wb = _pair()
    with pytest.raises(SpearError, match="merge.name"):
        merge_tensor("nope", wa, wb, 0.5)
    with pytest.raises(SpearError, match="shape"):
        merge_tensor("slerp", wa, wb[:-1], 0.5)


def test_stats_of_identical_and_integer_tensors():
    wa, _ = _pair()
    st = tensor_stats(wa, wa)
    assert st["rel_change"] == 0.0 and st["cos"] == pytest.approx(1.0)
    ints = torch.arange(10)
    out, st = merge_tensor("slerp", ints, ints + 1, 0.5)
    assert torch.equal(out, ints)  # never interpolated


@pytest.mark.parametrize("kernel", sorted(KERNELS))
def test_scratch_buffer_gives_the_same_result(kernel):
    wa, wb = _pair((30, 20))
    scratch = torch.full((1000,), float("nan"))
    fresh, _ = merge_tensor(kernel, wa, wb, 0.6, name="n", params=PARAMS[kernel])
    reused, _ = merge_tensor(kernel, wa, wb, 0.6, name="n", params=PARAMS[kernel], out=scratch)
    assert reused.shape == wa.shape and torch.equal(fresh, reused)
    assert reused.data_ptr() == scratch.data_ptr()


def test_check_finite_names_the_checkpoint():
    wa, wb = _pair()
    wb[3, 3] = float("inf")
    with pytest.raises(SpearError, match="tensor w in /base has NaN or Inf"):
        merge_tensor("slerp", wa, wb, 0.0, name="w", check_finite=True, labels=("/adapted", "/base"))
    huge = torch.full((4,), 1e30)  # finite, but its sum of squares overflows float32: not an error
    out, _ = merge_tensor("linear", huge, huge, 0.5, check_finite=True)
    assert torch.isfinite(out).all()


def _planted(rank: int, shape=(96, 64), signal=3.0, noise=0.01, seed=0):
    """A base matrix and an adapted one = base + a rank-``rank`` drift + iid noise."""
    g = torch.Generator().manual_seed(seed)
    wb = torch.randn(shape, generator=g)
    m, n = shape
    u, _ = torch.linalg.qr(torch.randn(m, rank, generator=g))
    v, _ = torch.linalg.qr(torch.randn(n, rank, generator=g))
    low_rank = (u * torch.linspace(signal, 2 * signal, rank)) @ v.T
    return wb + low_rank + noise * torch.randn(shape, generator=g), wb, low_rank


def test_dg_hard_recovers_the_rank_of_a_planted_delta_and_drops_its_noise():
    wa, wb, low_rank = _planted(rank=4)
    merged, stats = merge_tensor("dg_hard", wa, wb, 0.0, name="w", params={"scope": "all"})
    assert stats["rank_kept"] == 4 and stats["rank"] == 64
    # closer to the planted signal than the adapted tensor, whose delta still has the noise
    assert (merged - wb - low_rank).norm() < 0.5 * (wa - wb - low_rank).norm()
    half, _ = merge_tensor("dg_hard", wa, wb, 0.5, name="w", params={"scope": "restored"})
    assert torch.allclose(half - wb, 0.5 * (merged - wb), atol=1e-5)


def test_dg_hard_returns_the_base_for_a_pure_noise_delta():
    g = torch.Generator().manual_seed(3)
    wb = torch.randn(80, 80, generator=g)
    wa = wb + 0.05 * torch.randn(80, 80, generator=g)
    merged, stats = merge_tensor("dg_hard", wa, wb, 0.0, name="w", params={"scope": "all"})
    assert stats["rank_kept"] == 0 and torch.equal(merged, wb)


def test_dg_hard_scope_decides_whether_t0_tensors_are_filtered():
    wa, wb, _ = _planted(rank=2)
    kept, _ = merge_tensor("dg_hard", wa, wb, 0.0, name="w", params={"scope": "restored"})
    filtered, _ = merge_tensor("dg_hard", wa, wb, 0.0, name="w", params={"scope": "all"})
    assert torch.equal(kept, wa) and not torch.equal(filtered, wa)


def test_dg_hard_leaves_vectors_to_task_arithmetic():
    wa, wb = _pair(shape=(64,))
    merged, stats = merge_tensor("dg_hard", wa, wb, 0.25, name="norm", params={"scope": "restored"})
    reference, _ = merge_tensor("task_arithmetic", wa, wb, 0.25, name="norm")
    assert torch.equal(merged, reference) and stats["rank_kept"] is None
