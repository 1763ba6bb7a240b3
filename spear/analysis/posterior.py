"""Posterior (measured) impact, SPEC §1.4: restore one layer at a time and measure.

The adapted model is loaded once; :class:`spear.merging.inmemory.InMemoryMerger` restores a
single layer (``t=1``) in place, the general proxy (mean NLL on general text) and the domain
proxy (mean NLL on held-out domain text) are measured, and the layer is put back. A layer's
score is its general recovery ``nll_general(adapted) - nll_general(restored)`` minus
``posterior.domain_weight`` times its domain cost ``nll_domain(restored) - nll_domain(adapted)``.
Costs ``2 + num_layers`` evaluations of each corpus (``x3`` layers with ``posterior.groups``).
It is the yardstick of the cheap proxies: ranking.json gets ``proxy_vs_posterior``, the
Spearman correlation of every metric's layer score (and of each ``conf/impact`` preset) with it.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

from spear.errors import SpearError

log = logging.getLogger(__name__)

GROUPS = ("attn", "mlp")


def _corpus(path_value: Any, asset: str) -> tuple[Path, str]:
    from spear.embedded import asset_path

    path = Path(str(path_value)).expanduser() if path_value else asset_path(asset)
    if not path.is_file():
        key = "posterior.general_text" if asset == "general_text" else "posterior.domain_text"
        raise SpearError(f"posterior corpus {path} is not a file; set {key}=<text file>")
    text = path.read_text(encoding="utf-8", errors="replace")
    if len(text.strip()) < 100:
        raise SpearError(f"posterior corpus {path} is (almost) empty; give a text file with some paragraphs")
    return path, text


def impact_presets() -> dict[str, dict[str, float]]:
    """The components of every ``conf/impact/*.yaml`` preset (the cheap proxies to validate)."""
    from omegaconf import OmegaConf

    from spear.paths import CONF_DIR

    out: dict[str, dict[str, float]] = {}
    for f in sorted((CONF_DIR / "impact").glob("*.yaml")):
        node = OmegaConf.load(f)
        if node.get("name") == "posterior" or not node.get("components"):
            continue
        out[str(node.name)] = {str(k): float(v) for k, v in node.components.items()}
    return out


def measure_posterior(cfg, base_dir: Path, adapted_dir: Path, layer_map) -> dict[str, Any]:
    """Measure every layer's restoration effect; see the module docstring."""
    import torch

    from spear.analysis.metrics import resolve_device
    from spear.evaluation.perplexity import corpus_nll_from_ids, tokenize_corpus
    from spear.merging.inmemory import InMemoryMerger
    from spear.merging.policies import TMap
    from spear.models import load_model

    pc = cfg.posterior
    device = resolve_device(str(cfg.get("device", "auto")))
    general_path, general_text = _corpus(pc.get("general_text"), "general_text")
    domain_path, domain_text = _corpus(pc.get("domain_text"), "finance_heldout")
    model, tokenizer = load_model(str(adapted_dir), dtype=str(pc.get("dtype", "float32")), allow_pickle=bool(cfg.get("allow_pickle", False)))
    model.to(device)
    max_tokens = int(pc.max_tokens)
    ids = {
        "general": tokenize_corpus(tokenizer, general_text, max_tokens),
        "domain": tokenize_corpus(tokenizer, domain_text, max_tokens),
    }
    opts = {"max_length": int(pc.max_length), "stride": int(pc.stride), "batch_size": int(pc.batch_size)}
    merger = InMemoryMerger(model, base_dir, kernel="slerp")
    num_layers = layer_map.num_layers
    evals = 0
    t0 = time.perf_counter()

    def measure(tmap) -> dict[str, float]:
        nonlocal evals
        merger.apply(tmap)
        out = {}
        for corpus, corpus_ids in ids.items():
            out[corpus] = float(corpus_nll_from_ids(model, corpus_ids, **opts)["nll"])
            evals += 1
        return out

    units: list[tuple[str, Any, Any]] = [("adapted", None, TMap()), ("base", None, merger.base_tmap())]
    units += [("layer", layer, TMap(layer_t={layer: 1.0})) for layer in range(num_layers)]
    if bool(pc.get("groups", False)):
        units += [("group", (layer, g), TMap(group_t={(layer, g): 1.0})) for layer in range(num_layers) for g in GROUPS]
    from tqdm.auto import tqdm

    results: dict[Any, dict[str, float]] = {}
    try:
        with torch.no_grad():
            for kind, key, tmap in tqdm(units, desc="posterior", unit="eval", disable=not bool(cfg.get("progress", True)), leave=False):
                results[(kind, key)] = measure(tmap)
    finally:
        merger.release()
    ref = results[("adapted", None)]
    weight = float(pc.get("domain_weight", 0.0))

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
    if bool(pc.get("groups", False)):
        groups = {g: [effect(results[("group", (layer, g))])["score"] for layer in range(num_layers)] for g in GROUPS}
    seconds = time.perf_counter() - t0
    log.info("posterior: %d evaluations in %.1fs (adapted general nll %.4f, base %.4f)", evals, seconds, ref["general"], results[("base", None)]["general"])
    return {
        "score": [lay["score"] for lay in layers],
        "groups": groups,
        "layers": layers,
        "reference": {"adapted": ref, "base": results[("base", None)]},
        "corpora": {"general": str(general_path), "domain": str(domain_path), "tokens": {k: int(v.numel()) for k, v in ids.items()}},
        "evaluations": evals,
    }


def attach_posterior(ranking: dict[str, Any], result: dict[str, Any]) -> dict[str, Any]:
    """Add the measurements and ``proxy_vs_posterior`` (Spearman per cheap proxy) to a ranking."""
    from spear.analysis.scoring import _clean, proxy_correlations

    for lay, post in zip(ranking["layers"], result["layers"], strict=True):
        lay["posterior"] = {k: _clean(v) for k, v in post.items() if k != "layer"}
    ranking["posterior"] = {
        "reference": result["reference"],
        "corpora": result["corpora"],
        "evaluations": result["evaluations"],
        "score": "general_recovery - domain_weight * domain_change (NLL, nats per token)",
    }
    ranking["proxy_vs_posterior"] = proxy_correlations(ranking["layers"], result["score"], impact_presets())
    return ranking
