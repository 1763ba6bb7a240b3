"""The metric registry (SPEC §1.2): named, versioned per-matrix metrics and how to compute them.

Three kinds of metric:

- ``single``: a property of one matrix's spectrum, computed for both models
  (columns ``<name>_base`` and ``<name>_adapted``): ``snr``, ``snr_gd``, ``erank``.
- ``change``: a function of the base/adapted pair (column ``<name>``): ``rel_change``,
  ``sv_shift``, ``svdr`` (signal part), ``svdr_whole``, ``svdr_erank``.
- ``table``: needs the whole table of matrices (within-type percentiles, layer positions,
  a seeded stream): ``swci``, ``random``, ``position``.

Each matrix's base and adapted spectra are computed once (:func:`compute_table`, batched per
shape) and every metric is derived from them. A metric's ``version`` changes whenever its
definition does; ranking.json records the versions used.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from spear.errors import SpearError
from spear.runtime import resolve_device, torch_threads

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Metric:
    name: str
    version: str
    kind: str  # "single" | "change" | "table"
    description: str
    fn: Callable[..., Any]


@dataclass
class SpectraPair:
    """Spectra and norms of a batch of same-shape matrices of both models (torch tensors)."""

    s_base: Any  # [B, r] float32, descending
    s_adapted: Any  # [B, r]
    beta: float
    norm_base: Any  # [B] float64, ||Wb||_F
    norm_delta: Any  # [B] float64, ||Wa - Wb||_F


@dataclass
class MatrixRow:
    """One decoder-layer matrix and its metric values (plain floats)."""

    name: str
    layer: int
    module: str
    group: str
    shape: tuple[int, int]
    values: dict[str, float] = field(default_factory=dict)


@dataclass
class MatrixTable:
    rows: list[MatrixRow]
    num_layers: int
    columns: list[str]
    params: dict[str, Any]

    def column(self, name: str) -> list[float]:
        return [r.values[name] for r in self.rows]


# ---- metric functions -----------------------------------------------------------------------
def _snr(s, beta, params):
    from spear.analysis import spectra

    return spectra.spectrum_snr(s, beta)


def _snr_gd(s, beta, params):
    from spear.analysis import spectra

    return spectra.snr_gd(s, beta)


def _erank(s, beta, params):
    from spear.analysis import spectra

    return spectra.effective_rank(s)


def _rel_change(pair: SpectraPair, params):
    from spear.analysis import spectra

    return spectra.rel_change(pair.norm_delta, pair.norm_base)


def _sv_shift(pair: SpectraPair, params):
    from spear.analysis import spectra

    return spectra.sv_shift(pair.s_base, pair.s_adapted)


def _svdr(pair: SpectraPair, params):
    from spear.analysis import spectra

    mask = spectra.signal_mask(pair.s_base, pair.beta, params["svdr_threshold"])
    return spectra.sv_drop_ratio(pair.s_base, pair.s_adapted, mask)


def _svdr_whole(pair: SpectraPair, params):
    from spear.analysis import spectra

    return spectra.sv_drop_ratio(pair.s_base, pair.s_adapted)


def _svdr_erank(pair: SpectraPair, params):
    from spear.analysis import spectra

    return spectra.erank_drop(pair.s_base, pair.s_adapted)


SWCI_IMPORTANCE = ("snr_gd", "snr", "snr_gd_percentile", "snr_percentile")


def _swci(table: MatrixTable, params) -> list[float]:
    importance = params["swci_importance"]
    if importance not in SWCI_IMPORTANCE:
        raise SpearError(f"metrics.swci_importance={importance!r} is unknown; use one of {', '.join(SWCI_IMPORTANCE)}")
    source = "snr_gd_base" if importance.startswith("snr_gd") else "snr_base"
    weights = table.column(source)
    if importance.endswith("_percentile"):
        weights = within_type_percentiles(table.rows, weights)
    return [w * r.values["rel_change"] for w, r in zip(weights, table.rows, strict=True)]


def _random(table: MatrixTable, params) -> list[float]:
    import torch

    gen = torch.Generator().manual_seed(int(params["seed"]))
    return [float(v) for v in torch.rand(len(table.rows), generator=gen, dtype=torch.float64)]


POSITION_MODES = ("edges", "first", "last")


def _position(table: MatrixTable, params) -> list[float]:
    mode = params["position_mode"]
    if mode not in POSITION_MODES:
        raise SpearError(f"metrics.position_mode={mode!r} is unknown; use one of {', '.join(POSITION_MODES)}")
    last = max(1, table.num_layers - 1)
    out = []
    for r in table.rows:
        x = r.layer / last
        out.append(abs(2 * x - 1) if mode == "edges" else (1 - x if mode == "first" else x))
    return out


METRICS: dict[str, Metric] = {
    m.name: m
    for m in (
        Metric("snr", "spectrum-1", "single", "Spectrum SNR: (sum s>eps / sum s<=eps) / s0, eps = IQR/1.349*(1+sqrt(beta))", _snr),
        Metric("snr_gd", "gd-1", "single", "energy above / below the Gavish-Donoho threshold omega(beta)*median(s)", _snr_gd),
        Metric("erank", "roy-vetterli-1", "single", "effective rank exp(entropy(s/sum s))", _erank),
        Metric("rel_change", "1", "change", "||Wa - Wb||_F / ||Wb||_F", _rel_change),
        Metric("sv_shift", "1", "change", "sum |s(Wa) - s(Wb)| / sum s(Wb)", _sv_shift),
        Metric("svdr", "signal-1", "change", "sum max(0, s(Wb) - s(Wa)) / sum s(Wb) over the base's signal part", _svdr),
        Metric("svdr_whole", "whole-1", "change", "svdr over the whole spectrum", _svdr_whole),
        Metric("svdr_erank", "erank-1", "change", "relative effective-rank drop max(0, erank(Wb) - erank(Wa)) / erank(Wb)", _svdr_erank),
        Metric("swci", "1", "table", "importance(Wb) * rel_change, importance = metrics.swci_importance", _swci),
        Metric("random", "torch-uniform-1", "table", "seeded uniform control (seed)", _random),
        Metric("position", "1", "table", "layer position control (metrics.position_mode: edges/first/last)", _position),
    )
}


def columns() -> list[str]:
    """metrics.csv metric columns, in order."""
    out: list[str] = []
    for m in METRICS.values():
        out.extend([f"{m.name}_base", f"{m.name}_adapted"] if m.kind == "single" else [m.name])
    return out


def versions() -> dict[str, str]:
    return {name: m.version for name, m in METRICS.items()}


def metric_of_column(column: str) -> str:
    for suffix in ("_base", "_adapted"):
        if column.endswith(suffix) and METRICS.get(column[: -len(suffix)], None) and METRICS[column[: -len(suffix)]].kind == "single":
            return column[: -len(suffix)]
    return column


# ---- percentiles ----------------------------------------------------------------------------
def percentile_ranks(values: list[float]) -> list[float]:
    """Average-rank percentiles in [0, 1] (ties share their mean rank; a single value -> 0.5)."""
    n = len(values)
    if n == 1:
        return [0.5]
    order = sorted(range(n), key=lambda i: values[i])
    ranks = [0.0] * n
    i = 0
    while i < n:
        j = i
        while j + 1 < n and values[order[j + 1]] == values[order[i]]:
            j += 1
        mean_rank = (i + j) / 2.0
        for k in range(i, j + 1):
            ranks[order[k]] = mean_rank / (n - 1)
        i = j + 1
    return ranks


def within_type_percentiles(rows: list[MatrixRow], values: list[float]) -> list[float]:
    """Percentile of each value among the matrices of the same module type (q_proj with q_proj...)."""
    by_module: dict[str, list[int]] = {}
    for i, r in enumerate(rows):
        by_module.setdefault(r.module, []).append(i)
    out = [0.0] * len(rows)
    for idx in by_module.values():
        for i, p in zip(idx, percentile_ranks([values[i] for i in idx]), strict=True):
            out[i] = p
    return out


# ---- computation ----------------------------------------------------------------------------
def resolve_workers(workers: Any) -> int | None:
    """``spectra.workers``: auto -> None (torch's thread count), 0 = torch's own threading, n >= 1."""
    if workers is None or str(workers) == "auto":
        return None
    try:
        n = int(workers)
    except (TypeError, ValueError):
        n = -1
    if n < 0:
        raise SpearError(f"spectra.workers={workers!r} must be auto or an integer >= 0")
    return n


def resolve_method(method: str, device: str) -> str:
    from spear.analysis.spectra import SPECTRA_METHODS

    if method == "auto":
        return "svd" if device.startswith("cuda") else "gram"
    if method not in SPECTRA_METHODS:
        raise SpearError(f"spectra.method={method!r} is unknown; use auto or one of {', '.join(SPECTRA_METHODS)}")
    return method


def pair_metrics(pair: SpectraPair, params: dict[str, Any]) -> dict[str, list[float]]:
    """Every single and change metric of one batch, from its precomputed spectra."""
    out: dict[str, list[float]] = {}
    for m in METRICS.values():
        if m.kind == "single":
            out[f"{m.name}_base"] = m.fn(pair.s_base, pair.beta, params).tolist()
            out[f"{m.name}_adapted"] = m.fn(pair.s_adapted, pair.beta, params).tolist()
        elif m.kind == "change":
            out[m.name] = m.fn(pair, params).tolist()
    return out


def spectra_of_batch(
    base, adapted, method: str, device: str, workers: int | None = None, validate: Callable[[Any, Any], None] | None = None
) -> SpectraPair:
    """Spectra (once per matrix) and norms of stacked ``[B, n, p]`` base/adapted matrices.

    Matrices identical in both models (frozen during CPT) reuse the base spectrum.
    ``validate(norm_base, norm_delta)`` runs before the spectra (a non-finite norm means a NaN/Inf).
    """
    import torch

    from spear.analysis import spectra

    b = base.to(device)
    a = adapted.to(device)
    norm_base = spectra.frobenius(b)
    diff = torch.empty_like(b[0])
    norm_delta = torch.stack([spectra.frobenius(torch.sub(a[i], b[i], out=diff)) for i in range(b.shape[0])])
    del diff
    if validate is not None:
        validate(norm_base, norm_delta)
    changed = norm_delta > 0
    s_base = spectra.singular_values(b, method, workers)
    s_adapted = s_base.clone()
    if bool(changed.all()):
        s_adapted = spectra.singular_values(a, method, workers)
    elif bool(changed.any()):
        idx = torch.nonzero(changed).flatten()
        s_adapted[idx] = spectra.singular_values(a[idx], method, workers)
    n, p = b.shape[-2:]
    return SpectraPair(s_base.cpu(), s_adapted.cpu(), spectra.aspect_ratio(n, p), norm_base.cpu(), norm_delta.cpu())


def add_table_metrics(table: MatrixTable) -> None:
    for m in METRICS.values():
        if m.kind == "table":
            for row, v in zip(table.rows, m.fn(table, table.params), strict=True):
                row.values[m.name] = float(v)


def _progress(total: int, enabled: bool, desc: str):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="matrix", disable=not enabled, leave=False)


def compute_table(
    reader,
    layer_map,
    *,
    params: dict[str, Any],
    method: str,
    device: str,
    batch_bytes: int,
    progress: bool = True,
    workers: int | None = None,
) -> MatrixTable:
    """All metrics of every decoder-layer matrix of a :class:`TensorPairReader`, streaming.

    Matrices are read in same-shape batches of at most ``batch_bytes`` per model, spectra are
    computed once per matrix (on ``device``; on CPU by ``workers`` single-threaded workers, see
    :func:`spear.analysis.spectra.singular_values`), and the table metrics are added at the end.
    """
    """``params``: the ``metrics`` config and ``seed`` (what the metric values depend on)."""
    params = dict(params)
    device = resolve_device(device)
    method = resolve_method(method, device)
    refs = {n: layer_map.matrix_of(n) for n in reader.names}
    refs = {n: r for n, r in refs.items() if r is not None and len(reader.base.shape(n)) == 2}
    if not refs:
        raise SpearError(f"no decoder-layer matrices found in {reader.adapted.dir}; is it a supported causal LM?")
    module_order = {m: i for i, m in enumerate(layer_map.modules)}
    names = sorted(refs, key=lambda n: (refs[n].layer, module_order.get(refs[n].module, 99), n))
    import contextlib

    import torch

    from spear.io.reader import check_stack_finite, low_heap_retention

    values: dict[str, dict[str, float]] = {}
    if workers is None:
        workers = torch.get_num_threads()  # resolved before the block below sets torch's threads to 1
    # with CPU workers, small ops run inline too (waking torch's thread pool on shared cores costs more)
    single = device == "cpu" and workers != 0
    buffers: tuple[Any, Any] | None = None
    with (
        _progress(len(names), progress, "spectra") as bar,
        low_heap_retention(),
        torch_threads(1) if single else contextlib.nullcontext(),
    ):
        for batch_names in reader.plan_batches(names, max_bytes=batch_bytes):
            shape = reader.base.shape(batch_names[0])
            if buffers is None or tuple(buffers[0].shape[1:]) != shape or buffers[0].shape[0] < len(batch_names):
                buffers = None  # free the previous shape's buffers first
                buffers = tuple(torch.empty((len(batch_names), *shape), dtype=torch.float32) for _ in range(2))
            batch = reader.read_batch(batch_names, torch.float32, check_values=False, out=buffers)

            def validate(norm_base, norm_delta, batch=batch):
                if reader.check_values and not bool(torch.isfinite(norm_base).all() and torch.isfinite(norm_delta).all()):
                    check_stack_finite(batch.names, batch.base, reader.base.dir)
                    check_stack_finite(batch.names, batch.adapted, reader.adapted.dir)

            pair = spectra_of_batch(batch.base, batch.adapted, method, device, workers, validate)
            del batch.base, batch.adapted
            for col, vals in pair_metrics(pair, params).items():
                for name, v in zip(batch.names, vals, strict=True):
                    values.setdefault(name, {})[col] = float(v)
            bar.update(len(batch.names))
        buffers = None
    rows = [
        MatrixRow(n, refs[n].layer, refs[n].module, refs[n].group, tuple(reader.base.shape(n)), values[n]) for n in names
    ]
    table = MatrixTable(rows, layer_map.num_layers, columns(), {**params, "spectra_method": method})
    add_table_metrics(table)
    return table


def compute_single(
    checkpoint, layer_map, *, metric: str, method: str, device: str, batch_bytes: int,
    names: Iterable[str] | None = None, workers: int | None = None,
) -> list[MatrixRow]:
    """A ``single`` metric of one checkpoint's decoder-layer matrices, streaming (one model)."""
    from spear.analysis import spectra
    from spear.io.reader import plan_batches

    m = METRICS[metric]
    if m.kind != "single":
        raise ValueError(f"{metric} is not a single-model metric")
    device = resolve_device(device)
    method = resolve_method(method, device)
    refs = {n: layer_map.matrix_of(n) for n in (names or checkpoint.names)}
    refs = {n: r for n, r in refs.items() if r is not None and len(checkpoint.shape(n)) == 2}
    module_order = {mod: i for i, mod in enumerate(layer_map.modules)}
    ordered = sorted(refs, key=lambda n: (refs[n].layer, module_order.get(refs[n].module, 99), n))
    out: dict[str, float] = {}
    import torch

    from spear.io.reader import low_heap_retention

    with low_heap_retention():
        for batch in plan_batches(ordered, checkpoint.shape, batch_bytes):
            stack = checkpoint.get_stack(batch, torch.float32, check_values=True).to(device)
            s = spectra.singular_values(stack, method, workers)
            beta = spectra.aspect_ratio(*stack.shape[-2:])
            for name, v in zip(batch, m.fn(s, beta, {}).tolist(), strict=True):
                out[name] = float(v)
            del stack
    return [
        MatrixRow(n, refs[n].layer, refs[n].module, refs[n].group, tuple(checkpoint.shape(n)), {f"{metric}_base": out[n]})
        for n in ordered
    ]
