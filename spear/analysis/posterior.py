"""Posterior (measured) impact, SPEC §1.4: restore one layer at a time and measure.

The adapted model is loaded once; :class:`spear.merging.inmemory.InMemoryMerger` restores a
single layer (``t=1``, with the ``merge`` kernel) in place, the ``proxy`` is measured on the
calibration parts of its general and domain corpora (``impact.calibration_tokens`` each, never
evaluated text), and the layer is put back. A layer's score is its
general recovery ``nll_general(adapted) - nll_general(restored)`` minus ``impact.domain_weight`` times its domain cost ``nll_domain(restored) - nll_domain(adapted)``.
Costs ``2 + num_layers`` evaluations of each corpus (``x3`` layers with ``impact.groups``).
It is the yardstick of the cheap proxies: ranking.json gets ``proxy_vs_posterior``, the
Spearman correlation of every metric's layer score (and of each cheap ``impact`` option) with it.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

from spear.models.layer_map import GROUPS

log = logging.getLogger(__name__)


def impact_presets() -> dict[str, dict[str, float]]:
    """The components of every cheap ``impact`` option (the proxies the posterior validates)."""
    from spear.config.schema import GROUP_OPTIONS

    return {name: dict(opt.components) for name, opt in GROUP_OPTIONS["impact"].items() if name not in ("posterior", "grad_delta")}


def measure_posterior(cfg, base_dir: Path, adapted_dir: Path, layer_map) -> dict[str, Any]:
    """Measure every layer's restoration effect on the ``proxy`` (analysis config ``cfg``); see the module docstring."""
    import torch
    from tqdm.auto import tqdm

    from spear.evaluation.proxy import ProxyEvaluator
    from spear.merging.inmemory import InMemoryMerger
    from spear.merging.plan import TMap
    from spear.models import load_model
    from spear.runtime import resolve_device

    model, tokenizer = load_model(str(adapted_dir), **cfg.model.load_options())
    model.to(resolve_device(cfg.device))
    proxy = ProxyEvaluator(tokenizer, cfg.proxy, part="calibration", calibration_tokens=cfg.impact.calibration_tokens,
                           knob="impact.calibration_tokens")
    merger = InMemoryMerger(model, base_dir, cfg.merge)
    num_layers = layer_map.num_layers
    t0 = time.perf_counter()

    def measure(tmap) -> dict[str, float]:
        merger.apply(tmap)
        return proxy.nll(model, name=f"the adapted model {adapted_dir}")

    units: list[tuple[str, Any, Any]] = [("adapted", None, TMap()), ("base", None, merger.base_tmap())]
    units += [("layer", layer, TMap.of_layers({layer: 1.0})) for layer in range(num_layers)]
    if cfg.impact.groups:
        units += [("group", (layer, g), TMap({(layer, g): 1.0})) for layer in range(num_layers) for g in GROUPS]
    results: dict[Any, dict[str, float]] = {}
    try:
        with torch.no_grad():
            for kind, key, tmap in tqdm(units, desc="posterior", unit="eval", disable=not cfg.progress, leave=False):
                results[(kind, key)] = measure(tmap)
    finally:
        merger.release()
    ref = results[("adapted", None)]
    weight = cfg.impact.domain_weight

    def effect(nll: dict[str, float]) -> dict[str, float]:
        recovery = ref["general"] - nll["general"]
        domain_change = nll["domain"] - ref["domain"]
        return {
            "general_nll": nll["general"],
            "domain_nll": nll["domain"],
            "general_recovery": recovery,
            "domain_change": domain_change,
            "score": recovery - weight * domain_change,
        }

    layers = [{"layer": layer, **effect(results[("layer", layer)])} for layer in range(num_layers)]
    groups = None
    if cfg.impact.groups:
        groups = {g: [effect(results[("group", (layer, g))])["score"] for layer in range(num_layers)] for g in GROUPS}
    seconds = time.perf_counter() - t0
    log.info("posterior: %d evaluations in %.1fs (adapted general nll %.4f, base %.4f)", 2 * len(units), seconds,
             ref["general"], results[("base", None)]["general"])
    return {
        "score": [lay["score"] for lay in layers],
        "groups": groups,
        "layers": layers,
        "reference": {"adapted": ref, "base": results[("base", None)]},
        "corpora": {"general": cfg.proxy.general.source, "domain": cfg.proxy.domain.source,
                    "part": "calibration", "tokens": proxy.tokens()},
        "evaluations": 2 * len(units),
    }


def attach_measured(ranking: dict[str, Any], result: dict[str, Any], kind: str) -> dict[str, Any]:
    """Add a measured impact (``kind``: ``posterior`` or ``grad_delta``) to a ranking document: per layer
    ``layers[i][kind]``, the run's record ``ranking[kind]``, and ``proxy_vs_<kind>``, the Spearman
    correlation of every cheap proxy (metric column and ``impact`` option) with the measured score."""
    from spear.analysis.scoring import _clean, proxy_correlations

    for lay, measured in zip(ranking["layers"], result["layers"], strict=True):
        lay[kind] = {k: _clean(v) for k, v in measured.items() if k != "layer"}
    record = {k: v for k, v in result.items() if k not in ("score", "groups", "layers")}
    ranking[kind] = {**record, "score": "general_recovery - domain_weight * domain_change (NLL, nats per token)"}
    ranking[f"proxy_vs_{kind}"] = proxy_correlations(ranking["layers"], result["score"], impact_presets())
    return ranking
