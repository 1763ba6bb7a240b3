"""``impact=grad_delta``: the first-order effect of restoring each unit, from one backward pass per corpus.

For a calibration batch with loss ``L`` (mean next-token NLL) and a unit ``u`` (a decoder layer, or
one of its matrix groups), ``g_u = grad L(theta_adapted) . (theta_base - theta_adapted)`` restricted to
the unit's tensors is the first-order change of ``L`` when ``u`` is restored fully (``t=1``). It is
measured on a general and a domain calibration slice; a unit's score is its estimated general
recovery ``-g_u(general)`` minus ``impact.domain_weight`` times its domain cost ``g_u(domain)``: the
first-order estimate of ``impact=posterior``'s score, at the cost of two backward passes instead of
``2 + num_layers`` evaluations.

Calibration never overlaps evaluation: each corpus' calibration part is the ``impact.calibration_tokens``
scored tokens that follow what every evaluation reads (:func:`spear.evaluation.proxy.calibration_text`).
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

from spear.models.layer_map import GROUPS

log = logging.getLogger(__name__)


def _backward_mean_nll(model, text, max_length: int) -> None:
    """Backpropagate the weighted mean next-token NLL of a scored text, window by window (memory: one
    window's activations)."""
    import torch

    device = next(model.parameters()).device
    starts = [i for i in range(0, text.ids.numel() - 1, max_length) if text.ids[i:i + max_length].numel() >= 2]
    total = sum(float(text.weights[i + 1:i + max_length].sum()) for i in starts)
    for i in starts:
        ids, weights = text.ids[i:i + max_length].to(device), text.weights[i + 1:i + max_length].to(device)
        logits = model(input_ids=ids[None], use_cache=False).logits[0, :-1].float()
        nll = torch.nn.functional.cross_entropy(logits, ids[1:], reduction="none")
        ((nll * weights).sum() / total).backward()


def unit_directional_derivatives(model, base_dir: Path, batches: dict[str, Any], max_length: int, layer_map) -> dict:
    """``{role: {"layer": [g per layer], "groups": {group: [g per layer]}}}`` of ``grad L . (base - adapted)``."""
    import torch

    from spear.io.reader import Checkpoint
    from spear.merging.plan import GroupOf

    base = Checkpoint(Path(base_dir))
    group_of = GroupOf(layer_map)
    params = dict(model.named_parameters())
    owners = {name: (layer_map.layer_of(name), group_of(name)) for name in params}
    out = {}
    for role, text in batches.items():
        model.zero_grad(set_to_none=True)
        _backward_mean_nll(model, text, max_length)
        per_layer = [0.0] * layer_map.num_layers
        per_group = {g: [0.0] * layer_map.num_layers for g in GROUPS}
        with torch.no_grad():
            for name, param in params.items():
                layer, group = owners[name]
                if layer is None or param.grad is None:
                    continue
                delta = base.get(name).to(param.device, torch.float32) - param.float()
                g = float((param.grad.float() * delta).sum())
                per_layer[layer] += g
                if group is not None:
                    per_group[group][layer] += g
        out[role] = {"layer": per_layer, "groups": per_group}
    model.zero_grad(set_to_none=True)
    return out


def measure_grad_delta(cfg, base_dir: Path, adapted_dir: Path, layer_map) -> dict[str, Any]:
    """Score every layer (and group) by its first-order restoration effect; see the module docstring."""
    from spear.evaluation.proxy import calibration_text
    from spear.models import load_model
    from spear.runtime import resolve_device

    t0 = time.perf_counter()
    model, tokenizer = load_model(str(adapted_dir), **cfg.model.load_options())
    model.to(resolve_device(cfg.device)).eval()  # eval: no dropout; gradients still flow
    batches = {role: calibration_text(tokenizer, cfg.proxy, role, cfg.impact.calibration_tokens, "impact.calibration_tokens")
               for role in ("general", "domain")}
    g = unit_directional_derivatives(model, base_dir, batches, cfg.proxy.max_length, layer_map)
    weight = cfg.impact.domain_weight

    def score(general: float, domain: float) -> float:
        return -general - weight * domain

    n = layer_map.num_layers
    layers = [{"layer": i, "general_recovery": -g["general"]["layer"][i], "domain_change": g["domain"]["layer"][i],
               "score": score(g["general"]["layer"][i], g["domain"]["layer"][i])} for i in range(n)]
    groups = {grp: [score(g["general"]["groups"][grp][i], g["domain"]["groups"][grp][i]) for i in range(n)] for grp in GROUPS}
    log.info("grad_delta: 2 backward passes on %s calibration tokens in %.1fs",
             {k: v.tokens for k, v in batches.items()}, time.perf_counter() - t0)
    return {"score": [lay["score"] for lay in layers], "groups": groups, "layers": layers,
            "calibration": {role: {"source": getattr(cfg.proxy, role).source, "part": "calibration",
                                   "tokens": text.tokens} for role, text in batches.items()}}
