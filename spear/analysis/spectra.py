"""Pure spectral math on weight matrices (torch, float32; no IO, no config).

Every function is batched over a leading dimension: ``mats`` is ``[B, n, p]`` (or ``[n, p]``),
spectra ``s`` are ``[B, r]`` with ``r = min(n, p)`` in descending order. Definitions follow
SPEC §1.2; ``beta = min(n, p) / max(n, p)``.
"""

from __future__ import annotations

import math
from concurrent.futures import ThreadPoolExecutor

import torch

from spear.runtime import torch_threads

SPECTRA_METHODS = ("svd", "gram", "gram64")
# Spectrum's noise-scale estimate: IQR of a Gaussian is 1.349 sigma.
IQR_TO_SIGMA = 1.349


def aspect_ratio(n: int, p: int) -> float:
    """``beta = min(n, p) / max(n, p)`` of an ``n x p`` matrix."""
    return min(n, p) / max(n, p)


def _batched(mats: torch.Tensor) -> tuple[torch.Tensor, bool]:
    if mats.dim() == 2:
        return mats.unsqueeze(0), True
    if mats.dim() != 3:
        raise ValueError(f"expected a matrix or a batch of matrices, got shape {tuple(mats.shape)}")
    return mats, False


def singular_values(mats: torch.Tensor, method: str = "svd", workers: int | None = 0) -> torch.Tensor:
    """Singular values in descending order, float32, on ``mats``' device.

    ``svd``: ``torch.linalg.svdvals`` in float32. ``gram``: square roots of the eigenvalues of the
    Gram matrix on the smaller side (``W W^T`` or ``W^T W``), in float32: 2-3x faster on CPU,
    accurate to ~``sqrt(eps32) * s[0]`` in the smallest values. ``gram64``: the same in float64
    (more accurate than ``svd`` for the small values, ~1.5x faster than it on CPU).

    ``workers`` (CPU only): 0 leaves torch's threading alone; ``n >= 1`` splits the batch over
    ``n`` Python threads, each running its matrices single-threaded (``None``: torch's thread
    count). LAPACK's own multithreading on matrices of a few hundred rows is barrier-bound and
    collapses when cores are shared (10-30x slower on a loaded 2-core machine); one matrix per
    thread does not. Results agree up to float32 rounding whatever ``workers`` is.
    """
    batch, single = _batched(mats)
    if batch.device.type == "cpu" and workers != 0:
        n = torch.get_num_threads() if workers is None else int(workers)
        with torch_threads(1):
            if n <= 1 or batch.shape[0] == 1:
                s = _singular_values(batch, method)
            else:
                chunks = [c for c in batch.tensor_split(min(n, batch.shape[0])) if c.shape[0]]
                with ThreadPoolExecutor(len(chunks)) as pool:
                    s = torch.cat(list(pool.map(lambda c: _singular_values(c, method), chunks)))
    else:
        s = _singular_values(batch, method)
    return s[0] if single else s


def _singular_values(batch: torch.Tensor, method: str) -> torch.Tensor:
    if method == "svd":
        s = torch.linalg.svdvals(batch.to(torch.float32))
    elif method in ("gram", "gram64"):
        dtype = torch.float64 if method == "gram64" else torch.float32
        w = batch.to(dtype)
        gram = w.mT @ w if w.shape[-2] > w.shape[-1] else w @ w.mT  # the smaller side
        eig = torch.linalg.eigvalsh(gram)  # ascending
        s = eig.clamp_min(0).sqrt().flip(-1).to(torch.float32)
    else:
        raise ValueError(f"unknown spectra method {method!r}; use one of {', '.join(SPECTRA_METHODS)}")
    return s


def frobenius(mats: torch.Tensor) -> torch.Tensor:
    """Frobenius norm per matrix (``[B]``, float64; computed in float32 like the spectra)."""
    batch, single = _batched(mats)
    out = torch.linalg.vector_norm(batch.to(torch.float32), dim=(-2, -1)).to(torch.float64)
    return out[0] if single else out


def _as2d(s: torch.Tensor) -> tuple[torch.Tensor, bool]:
    return (s.unsqueeze(0), True) if s.dim() == 1 else (s, False)


def _ret(x: torch.Tensor, single: bool) -> torch.Tensor:
    return x[0] if single else x


def quantile(s: torch.Tensor, q: float) -> torch.Tensor:
    """Per-row quantile with linear interpolation (numpy's default), float64 (``[B]``)."""
    s2, single = _as2d(s)
    return _ret(torch.quantile(s2.to(torch.float64), q, dim=-1), single)


def mp_threshold(s: torch.Tensor, beta: float) -> torch.Tensor:
    """Spectrum's noise edge: ``sigma * (1 + sqrt(beta))`` with ``sigma = IQR(s) / 1.349``."""
    sigma = (quantile(s, 0.75) - quantile(s, 0.25)) / IQR_TO_SIGMA
    return sigma * (1.0 + math.sqrt(beta))


def spectrum_snr(s: torch.Tensor, beta: float) -> torch.Tensor:
    """Spectrum-compatible SNR: ``(sum s[s>eps] / sum s[s<=eps]) / s[0]`` (noise sum 0 -> 1).

    Only comparable within one module type (it is not scale-free: divided by ``s[0]``).
    """
    s2, single = _as2d(s)
    s64 = s2.to(torch.float64)
    eps = mp_threshold(s2, beta).unsqueeze(-1)
    above = s64 > eps
    signal = torch.where(above, s64, 0.0).sum(-1)
    noise = torch.where(above, 0.0, s64).sum(-1)
    noise = torch.where(noise == 0, torch.ones_like(noise), noise)
    top = s64[:, 0]
    out = torch.where(top > 0, signal / noise / torch.where(top > 0, top, 1.0), torch.zeros_like(top))
    return _ret(out, single)


def gd_omega(beta: float) -> float:
    """Gavish–Donoho ``omega(beta)`` for unknown noise (their cubic approximation)."""
    return 0.56 * beta**3 - 0.95 * beta**2 + 1.82 * beta + 1.43


def gd_threshold(s: torch.Tensor, beta: float) -> torch.Tensor:
    """Gavish–Donoho hard threshold ``tau = omega(beta) * median(s)`` (``[B]``, float64)."""
    return gd_omega(beta) * quantile(s, 0.5)


def signal_rank(s: torch.Tensor, beta: float) -> torch.Tensor:
    """Number of singular values strictly above the Gavish–Donoho threshold (``[B]``)."""
    s2, single = _as2d(s)
    return _ret((s2.to(torch.float64) > gd_threshold(s2, beta).unsqueeze(-1)).sum(-1), single)


def snr_gd(s: torch.Tensor, beta: float) -> torch.Tensor:
    """Energy (sum of ``s^2``) above the Gavish–Donoho threshold over the energy below it.

    Scale-free. A zero noise energy is floored at ``eps32 * total energy`` (finite, large);
    a zero matrix gives 0.
    """
    s2, single = _as2d(s)
    e = s2.to(torch.float64) ** 2
    tau = gd_threshold(s2, beta).unsqueeze(-1)
    above = s2.to(torch.float64) > tau
    signal = torch.where(above, e, 0.0).sum(-1)
    noise = torch.where(above, 0.0, e).sum(-1)
    total = signal + noise
    floor = torch.finfo(torch.float32).eps * total
    out = torch.where(total > 0, signal / torch.maximum(noise, floor).clamp_min(1e-300), torch.zeros_like(total))
    return _ret(out, single)


def signal_mask(s: torch.Tensor, beta: float, threshold: str = "gd") -> torch.Tensor:
    """Boolean ``[B, r]``: the signal part of a spectrum (above the ``gd`` or ``mp`` threshold)."""
    s2, single = _as2d(s)
    if threshold == "gd":
        t = gd_threshold(s2, beta)
    elif threshold == "mp":
        t = mp_threshold(s2, beta)
    else:
        raise ValueError(f"unknown noise threshold {threshold!r}; use gd or mp")
    return _ret(s2.to(torch.float64) > t.unsqueeze(-1), single)


def sv_shift(s_base: torch.Tensor, s_adapted: torch.Tensor) -> torch.Tensor:
    """``sum |s_i(Wa) - s_i(Wb)| / sum s_i(Wb)``: spectrum moved in either direction."""
    b, single = _as2d(s_base)
    a, _ = _as2d(s_adapted)
    b64, a64 = b.to(torch.float64), a.to(torch.float64)
    den = b64.sum(-1)
    out = torch.where(den > 0, (a64 - b64).abs().sum(-1) / torch.where(den > 0, den, 1.0), torch.zeros_like(den))
    return _ret(out, single)


def sv_drop_ratio(s_base: torch.Tensor, s_adapted: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """SVDR: ``sum_i max(0, s_i(Wb) - s_i(Wa)) / sum_i s_i(Wb)`` over ``mask`` (default: all ``i``).

    A row whose mask is empty falls back to the whole spectrum.
    """
    b, single = _as2d(s_base)
    a, _ = _as2d(s_adapted)
    b64, a64 = b.to(torch.float64), a.to(torch.float64)
    if mask is None:
        m = torch.ones_like(b64, dtype=torch.bool)
    else:
        m, _ = _as2d(mask)
        m = torch.where(m.any(-1, keepdim=True), m, torch.ones_like(m))
    drop = torch.where(m, (b64 - a64).clamp_min(0), 0.0).sum(-1)
    den = torch.where(m, b64, 0.0).sum(-1)
    out = torch.where(den > 0, drop / torch.where(den > 0, den, 1.0), torch.zeros_like(den))
    return _ret(out, single)


def effective_rank(s: torch.Tensor) -> torch.Tensor:
    """Roy–Vetterli effective rank ``exp(H(s / sum s))`` (``[B]``, float64); 0 for a zero matrix."""
    s2, single = _as2d(s)
    s64 = s2.to(torch.float64)
    total = s64.sum(-1, keepdim=True)
    p = s64 / torch.where(total > 0, total, 1.0)
    h = -torch.where(p > 0, p * torch.log(torch.where(p > 0, p, 1.0)), 0.0).sum(-1)
    out = torch.where(total.squeeze(-1) > 0, torch.exp(h), torch.zeros_like(h))
    return _ret(out, single)


def erank_drop(s_base: torch.Tensor, s_adapted: torch.Tensor) -> torch.Tensor:
    """Relative effective-rank drop ``max(0, erank(Wb) - erank(Wa)) / erank(Wb)``."""
    eb, ea = effective_rank(s_base), effective_rank(s_adapted)
    return torch.where(eb > 0, (eb - ea).clamp_min(0) / torch.where(eb > 0, eb, 1.0), torch.zeros_like(eb))


def rel_change(norm_delta: torch.Tensor, norm_base: torch.Tensor) -> torch.Tensor:
    """``||D||_F / ||Wb||_F`` from precomputed norms (0 when the base is a zero matrix)."""
    nd, nb = norm_delta.to(torch.float64), norm_base.to(torch.float64)
    return torch.where(nb > 0, nd / torch.where(nb > 0, nb, 1.0), torch.zeros_like(nb))
