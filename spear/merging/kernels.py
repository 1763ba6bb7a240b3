"""Merge kernels: pure math on one pair of tensors (no IO, no model, no config).

Every kernel merges an adapted tensor ``wa`` toward the base tensor ``wb`` with restoration
strength ``t`` (SPEC §1.5): ``t=0`` keeps the adapted tensor and ``t=1`` returns the base one.
Both ends are short-circuited, so they are bit-exact whatever the float math would give:
``t=0`` returns ``wa`` itself and ``t=1`` returns ``wb`` (cast to ``wa``'s dtype when they
differ). Callers must therefore treat results as read-only (they may be an input).

Math is done in float32 (float64 inputs stay float64) and the result is cast back to the
adapted dtype. Large tensors are processed in chunks that stay in cache, and reductions are
accumulated in float64 across chunks, so the statistics of a 100M-element embedding are as
accurate as those of a small matrix.

Kernels:

* ``slerp``: ``cos = <Wa,Wb>/(|Wa||Wb|)``, ``O = arccos(cos)``,
  ``W = sin((1-t)O)/sin(O) Wa + sin(tO)/sin(O) Wb``; linear fallback only when ``sin(O)`` is
  numerically zero (``< SIN_EPS``: parallel or antipodal tensors, or a zero tensor), or, with
  ``dot_threshold`` set (mergekit uses 0.9995), whenever ``|cos| > dot_threshold``.
* ``linear``: ``W = (1-t) Wa + t Wb``.
* ``task_arithmetic``: ``W = Wb + (1-t) D`` with the CPT delta ``D = Wa - Wb`` (the same
  model as ``linear``, computed from the delta).
* ``ties``: ``W = Wb + (1-t) trim(D)``, ``trim`` keeping the ``density`` fraction of entries
  of largest magnitude (TIES-merging's trim step; sign election is void for a single delta).
* ``dare``: ``W = Wb + (1-t) mask * D / density``, ``mask`` Bernoulli(``density``) seeded by
  ``seed`` and the tensor name (deterministic, independent of the tensor order).

* ``dg_hard`` (DG-Hard, SPEC §1.8): ``W = Wb + (1-t) U diag(s [s > tau]) V^T`` from the SVD of a
  2-D delta, ``tau`` the Gavish–Donoho hard threshold for unknown noise
  (``omega(beta) * median(s)``): the delta's signal directions are kept, its noise floor dropped.
  Other tensors (norms, biases) take ``task_arithmetic``.

For ``ties``, ``dare`` and ``dg_hard``, ``t=0`` still means "do not touch this tensor" (it keeps
the adapted tensor, untrimmed); the filtered delta applies to tensors with ``t > 0``. The one
exception is ``dg_hard`` with ``scope="all"``: it filters every tensor's delta, ``t=0`` included
(DG-Hard on its own, data-free), see :func:`acts_at_zero`.

Each kernel returns ``(merged, info)``; ``info`` holds ``fallback`` (true when SLERP fell back to
linear interpolation) and kernel-specific fields (``dg_hard``: ``rank_kept`` of ``rank``, both
``None`` for a tensor that is not a matrix). :func:`merge_tensor` adds them to
:func:`tensor_stats`'s dict and ``t``.
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Callable
from typing import Any

from spear.errors import SpearError

SIN_EPS = 1e-6  # sin(O) below this is "numerically zero": SLERP falls back to linear
CHUNK = 1 << 18  # elements per chunk (1 MiB of float32): amortises per-op dispatch, stays in L2/L3
STAT_KEYS = ("t", "cos", "angle", "rel_change", "fallback")


def check_t(t: float, what: str = "t") -> float:
    """``t`` as a float in [0, 1], else a :class:`SpearError`."""
    try:
        value = float(t)
    except (TypeError, ValueError):
        raise SpearError(f"{what}={t!r} is not a number; restoration strengths are floats in [0, 1]") from None
    if not (0.0 <= value <= 1.0):  # also rejects NaN
        raise SpearError(f"{what}={t!r} is outside [0, 1]; 0 keeps the adapted weights, 1 restores the base")
    return value


def _compute_dtype(wa):
    import torch

    return torch.float64 if wa.dtype == torch.float64 else torch.float32


def _flat(x, dtype):
    x = x.reshape(-1)
    return x if x.dtype == dtype else x.to(dtype)


def _chunks(n: int):
    for i in range(0, n, CHUNK):
        yield i, min(i + CHUNK, n)


def _sums(wa, wb) -> tuple[float, float, float]:
    """``(|Wa|^2, |Wb|^2, |Wa - Wb|^2)``: float32 chunk dots, float64 accumulation."""
    import torch

    dtype = _compute_dtype(wa)
    a, b = wa.reshape(-1), wb.reshape(-1)
    aa = bb = dd = 0.0
    for i, j in _chunks(a.numel()):
        x, y = a[i:j].to(dtype), b[i:j].to(dtype)
        aa += float(torch.dot(x, x))
        bb += float(torch.dot(y, y))
        d = x - y
        dd += float(torch.dot(d, d))
    return aa, bb, dd


def _stats_from_sums(aa: float, bb: float, dd: float) -> dict[str, Any]:
    if not (math.isfinite(aa) and math.isfinite(bb) and math.isfinite(dd)):
        return {"cos": None, "angle": None, "rel_change": None}
    na, nb = math.sqrt(aa), math.sqrt(bb)
    if na > 0 and nb > 0:
        # |a/|a| - b/|b||^2 = (|a-b|^2 - (|a|-|b|)^2) / (|a||b|): the chord between the unit
        # tensors, accurate for small angles (where arccos of a rounded cosine is not).
        chord2 = max(0.0, min(4.0, (dd - (na - nb) ** 2) / (na * nb)))
        cos = 1.0 - chord2 / 2.0
        angle = 2.0 * math.asin(min(1.0, math.sqrt(chord2) / 2.0))
    else:
        cos = angle = None
    if nb > 0:
        rel = math.sqrt(dd) / nb
    else:
        rel = 0.0 if dd == 0 else None
    return {"cos": cos, "angle": angle, "rel_change": rel}


def tensor_stats(wa, wb) -> dict[str, Any]:
    """``cos``, ``angle`` (radians) and ``rel_change = |Wa - Wb| / |Wb|`` (SPEC §1.2) of a pair.

    ``cos = <Wa,Wb>/(|Wa||Wb|)`` is computed as ``(|Wa|^2 + |Wb|^2 - |Wa-Wb|^2) / (2|Wa||Wb|)``
    and the angle from the chord between the unit tensors (the same quantities, three dot
    products per chunk instead of four, and an angle accurate down to ~1e-7 rad).
    ``cos``/``angle`` are ``None`` when either tensor is all zeros; ``rel_change`` is ``None``
    when ``Wb`` is zero but ``Wa`` is not; all three are ``None`` for non-finite tensors.
    """
    import torch

    if not wa.is_floating_point():
        same = bool(torch.equal(wa, wb))
        return {"cos": None, "angle": None, "rel_change": 0.0 if same else None}
    return _stats_from_sums(*_sums(wa, wb))


def _nonfinite(wa, wb, name: str, labels: tuple[str, str]) -> None:
    import torch

    for tensor, label in ((wa, labels[0]), (wb, labels[1])):
        if not bool(torch.isfinite(tensor).all()):
            raise SpearError(f"tensor {name} in {label} has NaN or Inf values; the checkpoint is corrupt, re-export it")


def _alloc(wa, out):
    """The result buffer: a view of the caller's scratch ``out`` when given, else a new tensor."""
    import torch

    n = wa.numel()
    if out is None:
        return torch.empty(n, dtype=wa.dtype)
    if out.dtype != wa.dtype or out.numel() < n or not out.is_contiguous():
        raise ValueError("scratch buffer too small or of the wrong dtype")
    return out.reshape(-1)[:n]


def _combine(wa, wb, ca: float, cb: float, out=None):
    """``ca * wa + cb * wb`` in the compute dtype, chunked, cast to ``wa``'s dtype."""
    import torch

    dtype = _compute_dtype(wa)
    a, b = wa.reshape(-1), wb.reshape(-1)
    out = _alloc(wa, out)
    direct = wa.dtype == dtype
    for i, j in _chunks(a.numel()):
        x, y = a[i:j].to(dtype), b[i:j].to(dtype)
        if direct:  # write straight into the output
            o = torch.mul(x, ca, out=out[i:j])
        else:
            o = torch.mul(x, ca)
        o.add_(y, alpha=cb)
        if not direct:
            out[i:j] = o
    return out.reshape(wa.shape)


def _delta_merge(wa, wb, scale: float, mask_fn: Callable | None = None, rescale: float = 1.0, out=None):
    """``Wb + scale * mask * (Wa - Wb) * rescale`` in the compute dtype, cast to ``wa``'s dtype."""
    import torch

    dtype = _compute_dtype(wa)
    a, b = wa.reshape(-1), wb.reshape(-1)
    out = _alloc(wa, out)
    for i, j in _chunks(a.numel()):
        x, y = a[i:j].to(dtype), b[i:j].to(dtype)
        d = x - y
        if mask_fn is not None:
            d.mul_(mask_fn(i, j, d))
        out[i:j] = torch.add(y, d, alpha=scale * rescale)  # never in place: y may view wb
    return out.reshape(wa.shape)


# --------------------------------------------------------------------------------------- kernels


def slerp(wa, wb, t: float, *, dot_threshold: float | None = None, stats: dict | None = None, out=None, **_):
    """Spherical interpolation of the flattened tensors (SPEC §1.5)."""
    st = stats if stats is not None else tensor_stats(wa, wb)
    cos, angle = st["cos"], st["angle"]
    fallback = cos is None or math.sin(angle) < SIN_EPS
    if not fallback and dot_threshold is not None and abs(cos) > float(dot_threshold):
        fallback = True
    if fallback:
        return _combine(wa, wb, 1.0 - t, t, out), {"fallback": True}
    s = math.sin(angle)
    return _combine(wa, wb, math.sin((1.0 - t) * angle) / s, math.sin(t * angle) / s, out), {"fallback": False}


def linear(wa, wb, t: float, *, out=None, **_):
    return _combine(wa, wb, 1.0 - t, t, out), {"fallback": False}


def task_arithmetic(wa, wb, t: float, *, out=None, **_):
    return _delta_merge(wa, wb, 1.0 - t, out=out), {"fallback": False}


def _check_density(density) -> float:
    density = float(density)
    if not 0.0 < density <= 1.0:
        raise SpearError(f"merge.density={density} must be in (0, 1]; it is the fraction of the delta kept")
    return density


def ties(wa, wb, t: float, *, density: float = 0.2, out=None, **_):
    import torch

    density = _check_density(density)
    if density >= 1.0:
        return _delta_merge(wa, wb, 1.0 - t, out=out), {"fallback": False}
    dtype = _compute_dtype(wa)
    delta = (_flat(wa, dtype) - _flat(wb, dtype)).abs_()
    n = delta.numel()
    k = max(1, math.ceil(density * n))
    threshold = float(torch.kthvalue(delta, n - k + 1).values) if k < n else -1.0
    del delta

    def mask(i, j, d):
        return d.abs() >= threshold

    return _delta_merge(wa, wb, 1.0 - t, mask, out=out), {"fallback": False}


def dare(wa, wb, t: float, *, density: float = 0.2, seed: int = 0, name: str = "", out=None, **_):
    import torch

    density = _check_density(density)
    if density >= 1.0:
        return _delta_merge(wa, wb, 1.0 - t, out=out), {"fallback": False}
    gen = torch.Generator().manual_seed((int(seed) * 1_000_003 + zlib.crc32(name.encode())) % (2**63))
    keep = torch.rand(wa.numel(), generator=gen, dtype=torch.float32) < density

    def mask(i, j, d):
        return keep[i:j]

    return _delta_merge(wa, wb, 1.0 - t, mask, rescale=1.0 / density, out=out), {"fallback": False}


def gavish_donoho_omega(beta: float) -> float:
    """Gavish & Donoho (2014), eq. (5): the optimal hard threshold is ``omega(beta) * median(s)``
    for a matrix of aspect ratio ``beta = min(m, n) / max(m, n)`` with unknown noise level."""
    return 0.56 * beta**3 - 0.95 * beta**2 + 1.82 * beta + 1.43


def dg_hard(wa, wb, t: float, *, out=None, **_):
    """DG-Hard: the CPT delta's singular directions above the Gavish–Donoho threshold, scaled by ``1-t``."""
    import torch

    if wa.ndim != 2 or min(wa.shape) < 2:
        return _delta_merge(wa, wb, 1.0 - t, out=out), {"fallback": False, "rank_kept": None, "rank": None}
    dtype = _compute_dtype(wa)
    base = wb.to(dtype)
    delta = wa.to(dtype) - base
    u, s, vh = torch.linalg.svd(delta, full_matrices=False)
    beta = min(delta.shape) / max(delta.shape)
    tau = gavish_donoho_omega(beta) * float(s.median())
    keep = int((s > tau).sum())
    merged = base if keep == 0 else torch.addmm(base, u[:, :keep] * s[:keep], vh[:keep], alpha=1.0 - t)
    target = _alloc(wa, out).reshape(wa.shape)
    target.copy_(merged)
    return target, {"fallback": False, "rank_kept": keep, "rank": int(s.numel())}


def acts_at_zero(kernel: str, params: dict[str, Any] | None) -> bool:
    """Whether ``kernel`` changes a tensor at ``t=0`` (only ``dg_hard`` with ``scope="all"``)."""
    return kernel == "dg_hard" and (params or {}).get("scope") == "all"


KERNELS: dict[str, Callable] = {
    "slerp": slerp,
    "linear": linear,
    "task_arithmetic": task_arithmetic,
    "ties": ties,
    "dare": dare,
    "dg_hard": dg_hard,
}

def check_kernel(kernel: str) -> Callable:
    if kernel not in KERNELS:
        raise SpearError(f"merge.name={kernel!r} is not a merge kernel; use one of {', '.join(KERNELS)}")
    return KERNELS[kernel]


def merge_tensor(
    kernel: str,
    wa,
    wb,
    t: float,
    *,
    name: str = "",
    params: dict[str, Any] | None = None,
    with_stats: bool = True,
    check_finite: bool = False,
    labels: tuple[str, str] = ("adapted", "base"),
    out=None,
):
    """Merge one tensor pair with ``kernel`` at strength ``t``: ``(merged, stats)``.

    ``t=0`` returns ``wa`` itself and ``t=1`` returns ``wb`` (cast to ``wa``'s dtype), bit-exactly
    (``t=0`` except where :func:`acts_at_zero`).
    ``stats`` holds ``t``, ``cos``, ``angle``, ``rel_change``, ``fallback``; without
    ``with_stats`` only ``t`` and ``fallback`` (and SLERP still computes what it needs).
    Non-float tensors are never interpolated: they keep ``wa`` unless ``t == 1``.
    ``check_finite`` raises a :class:`SpearError` for NaN/Inf in either tensor (free: it reads
    the sums of squares the statistics need; ``labels`` name the two checkpoints).
    ``out``: an optional contiguous scratch tensor (``wa``'s dtype, at least ``wa.numel()``
    elements) that the result is written into (a view of it is returned): reusing one buffer
    avoids page-faulting fresh memory for every large tensor of a streaming merge.
    """
    fn = check_kernel(kernel)
    t = check_t(t, "t" if not name else f"t of {name}")
    if tuple(wa.shape) != tuple(wb.shape):
        raise SpearError(f"tensor {name} has shape {list(wb.shape)} in base but {list(wa.shape)} in adapted")
    stats: dict[str, Any] = {"t": t, "cos": None, "angle": None, "rel_change": None, "fallback": False}
    need = with_stats or check_finite or (kernel == "slerp" and 0.0 < t < 1.0)
    pair_stats = None
    if need and wa.is_floating_point():
        sums = _sums(wa, wb)
        if check_finite and not all(math.isfinite(v) for v in sums):
            _nonfinite(wa, wb, name, labels)  # raises, unless it was an overflow of huge finite values
        pair_stats = _stats_from_sums(*sums)
    elif need:
        pair_stats = tensor_stats(wa, wb)
    if pair_stats is not None:
        stats.update(pair_stats)
    if t == 0.0 and not acts_at_zero(kernel, params):
        return wa, stats
    if t == 1.0:
        return (wb if wb.dtype == wa.dtype else wb.to(wa.dtype)), stats
    if not wa.is_floating_point():
        return wa, stats
    kwargs = dict(params or {})
    merged, info = fn(wa, wb, t, stats=pair_stats, name=name, out=out, **kwargs)
    stats.update(info)
    return merged.reshape(wa.shape), stats
