"""``policy=optimized``: restoration strengths fitted to a loss through the merged model (SPEC §1.8).

Rankings built from how weights moved slide along the uniform-interpolation curve; coefficients
fitted to a loss can leave it (AdaMerging). Here every unit (a decoder layer, or a layer's
``attn``/``mlp`` group with ``granularity=module``, or all layers together with ``tie_layers``, plus
embeddings/final norm/lm_head as one unit with ``fit_non_layer``) gets ``t = sigmoid(z)``, and Adam on ``z`` minimises

    general NLL + ``domain_weight`` x domain NLL

of the model merged at those ``t``, on windows sampled from the calibration parts of the two
proxy corpora (:func:`spear.evaluation.proxy.calibration_text`: the ``calibration_tokens`` after what
every evaluation reads; for chat records, only answer tokens count), so the fit never sees
evaluation text. The merged weights are a differentiable function of ``t`` with the
``merge`` kernel's own coefficients (``linear``/``task_arithmetic``: ``W = Wa + t (Wb - Wa)``;
``slerp``: the per-tensor angle is fixed, the ``sin`` weights are differentiated), and each tensor's
``t`` is the same linear function of the unit ``t`` that :class:`~spear.merging.plan.MergePlan`
applies (probed from the plan itself), so the fitted :class:`TMap` merges to exactly the model that
was optimised. The kernels that filter the delta (``ties``, ``dare``, ``dg_hard``) are not
differentiable in ``t`` at 0 and are refused.
"""

from __future__ import annotations

import logging
import math
import time
from pathlib import Path
from typing import Any

from spear.analysis.ranking import Unit
from spear.errors import SpearError
from spear.merging.plan import MergePlan, TMap
from spear.models.layer_map import GROUPS

log = logging.getLogger(__name__)

DIFFERENTIABLE = ("slerp", "linear", "task_arithmetic")
NON_LAYER = "non_layer"
ALL_LAYERS = "layers"  # the one unit of tie_layers


def check_fit_kernel(merge) -> None:
    if merge.name not in DIFFERENTIABLE:
        raise SpearError(f"policy=optimized fits t through the merge kernel, and merge={merge.name} is not differentiable "
                         f"in t; use merge=slerp or merge=linear (fit), then compare kernels with the fitted t map")


def fit_units(policy, num_layers: int) -> list[Unit | str]:
    """The units whose ``t`` is fitted, in the order of the fitted vector."""
    if policy.tie_layers:
        units: list[Unit | str] = [ALL_LAYERS]
    elif policy.granularity == "layer":
        units = [Unit(layer) for layer in range(num_layers)]
    else:
        units = [Unit(layer, group) for layer in range(num_layers) for group in GROUPS]
    return [*units, NON_LAYER] if policy.fit_non_layer else units


def tmap_of(units: list[Unit | str], ts: list[float], policy, num_layers: int) -> TMap:
    """The :class:`TMap` of fitted unit ``ts`` (module granularity: layer norms take the mean of the groups)."""
    values = dict(zip(units, ts, strict=True))
    non_layer = values.pop(NON_LAYER, policy.non_layer_t)
    if ALL_LAYERS in values:
        return TMap.of_layers(dict.fromkeys(range(num_layers), values[ALL_LAYERS]), non_layer)
    if policy.granularity == "layer":
        return TMap(values, non_layer)
    return TMap.of_groups(values, num_layers, non_layer)


def tensor_weights(units, policy, num_layers: int, layer_map, names, merge) -> dict[str, tuple[float, list[tuple[int, float]]]]:
    """``{name: (offset, [(unit index, weight)])}``: each tensor's ``t`` as the plan's affine function of the
    unit ``t`` (the offset is ``non_layer_t`` where that is not fitted)."""
    fixed = MergePlan.build(tmap_of(units, [0.0] * len(units), policy, num_layers), layer_map, names, merge)
    weights: dict[str, tuple[float, list[tuple[int, float]]]] = {name: (fixed[name].t, []) for name in names}
    unfixed = policy.replace(non_layer_t=0.0)
    for i in range(len(units)):
        basis = [1.0 if j == i else 0.0 for j in range(len(units))]
        plan = MergePlan.build(tmap_of(units, basis, unfixed, num_layers), layer_map, names, merge)
        for name in names:
            if plan[name].t:
                weights[name][1].append((i, plan[name].t))
    return weights


class MergedParameters:
    """The merged parameters of a loaded adapted model as a differentiable function of the unit ``t``."""

    def __init__(self, model, base_dir: Path, merge, weights: dict[str, tuple[float, list[tuple[int, float]]]]) -> None:
        import torch

        from spear.io.reader import Checkpoint, check_finite
        from spear.merging.kernels import SIN_EPS, tensor_stats

        base = Checkpoint(Path(base_dir))
        self.kernel = merge.name
        self.terms: dict[str, tuple[Any, Any, float, list[tuple[int, float]], float | None]] = {}
        for name, param in model.named_parameters():  # tied parameters are listed once
            offset, terms = weights[name]
            if not (offset or terms) or not param.is_floating_point():
                continue
            wa = param.detach()
            wb = base.get(name).to(wa.device, wa.dtype)
            if merge.check_values:
                check_finite(name, wb, base.dir)
            angle = None
            if self.kernel == "slerp":
                stats = tensor_stats(wa.cpu(), wb.cpu())
                dot = merge.dot_threshold
                linear = stats["cos"] is None or math.sin(stats["angle"]) < SIN_EPS or (
                    dot is not None and abs(stats["cos"]) > dot)
                angle = None if linear else stats["angle"]
            self.terms[name] = (wa, wb - wa, offset, terms, angle)
            del wb
        self._torch = torch

    def __call__(self, t) -> dict[str, Any]:
        """``{name: merged tensor}`` at unit strengths ``t`` (a 1-D tensor; gradients flow to it)."""
        out = {}
        for name, (wa, delta, offset, terms, angle) in self.terms.items():
            tp = sum((t[i] * w for i, w in terms), self._torch.tensor(offset, device=t.device))
            if angle is None:
                out[name] = wa + tp.to(wa.dtype) * delta
            else:  # W = ca Wa + cb Wb = (ca + cb) Wa + cb (Wb - Wa)
                s = math.sin(angle)
                ca, cb = self._torch.sin((1 - tp) * angle) / s, self._torch.sin(tp * angle) / s
                out[name] = (ca + cb).to(wa.dtype) * wa + cb.to(wa.dtype) * delta
        return out


def _mean_nlls(model, params, batches: dict[str, list[Any]], max_batch: int = 8) -> dict[str, Any]:
    """Weighted mean NLL per role of ``batches`` (``{role: [(ids, weights) windows]}``) under ``params``;
    windows of one length share a forward pass (batching the two corpora saves ~15% of a step on CPU)."""
    import torch
    from torch.func import functional_call

    totals = {role: 0.0 for role in batches}
    counts = {role: 0.0 for role in batches}
    items = [(role, window) for role, windows in batches.items() for window in windows]
    for length in sorted({ids.numel() for _, (ids, _) in items}):
        same = [(role, window) for role, window in items if window[0].numel() == length]
        for i in range(0, len(same), max_batch):
            chunk = same[i:i + max_batch]
            ids = torch.stack([w[0] for _, w in chunk])
            weights = torch.stack([w[1][1:] for _, w in chunk])
            logits = functional_call(model, params, args=(), kwargs={"input_ids": ids, "use_cache": False}).logits
            nll = torch.nn.functional.cross_entropy(logits[:, :-1].float().flatten(0, 1), ids[:, 1:].flatten(),
                                                    reduction="none").view(len(chunk), -1)
            for (role, _), value, weight in zip(chunk, (nll * weights).sum(1), weights.sum(1), strict=True):
                totals[role] = totals[role] + value
                counts[role] += float(weight)
    return {role: totals[role] / counts[role] for role in batches}


def _windows(text, size: int) -> list[Any]:
    """Consecutive ``(ids, weights)`` windows of a scored text (the whole text when shorter)."""
    n = text.ids.numel()
    return [(text.ids[i:i + size], text.weights[i:i + size]) for i in range(0, n - size + 1, size)] or [(text.ids, text.weights)]


def _scored_starts(weights, window: int):
    """Start positions of the windows of ``window`` tokens whose targets (all but the first) carry weight."""
    import torch

    cumulative = torch.cat([torch.zeros(1, device=weights.device), weights.cpu().cumsum(0).to(weights.device)])
    starts = torch.arange(0, weights.numel() - window + 1, device=weights.device)
    mass = cumulative[starts + window] - cumulative[starts + 1]
    valid = starts[mass > 0]
    if valid.numel() == 0:
        raise SpearError(f"no calibration window of {window} tokens holds a scored token; raise policy.window or "
                         "policy.calibration_tokens")
    return valid.cpu()


def _head(text, tokens: int):
    from spear.evaluation.scored import ScoredText

    return ScoredText(text.ids[:tokens], text.weights[:tokens])


def fit_tmap(model, tokenizer, base_dir: Path, policy, proxy, merge, *, progress: bool = False) -> tuple[TMap, dict[str, Any]]:
    """(fitted TMap, fit record) for the loaded adapted ``model``; the model is left unchanged."""
    import torch

    from spear.evaluation.proxy import calibration_text
    from spear.models.layer_map import layer_map_for

    check_fit_kernel(merge)
    start = time.perf_counter()
    layer_map = layer_map_for(model.config)
    n = layer_map.num_layers
    units = fit_units(policy, n)
    names = [name for name, _ in model.named_parameters()]
    weights = tensor_weights(units, policy, n, layer_map, names, merge)
    device = next(model.parameters()).device
    pools = {role: calibration_text(tokenizer, proxy, role, policy.calibration_tokens, "policy.calibration_tokens")
             for role in ("general", "domain")}
    pools = {role: type(text)(text.ids.to(device), text.weights.to(device)) for role, text in pools.items()}
    # evaluations read the first max_tokens of each corpus; the fit reads what follows them
    calibration = {role: {"source": getattr(proxy, role).source, "part": "calibration",
                          "evaluated_tokens": getattr(proxy, role).max_tokens, "tokens": text.tokens}
                   for role, text in pools.items()}
    window = min(policy.window, *(int(text.ids.numel()) for text in pools.values()))
    gen = torch.Generator().manual_seed(policy.seed)

    # a window must score something: chat text weights only answer tokens (target i is scored by weights[i])
    scored = {role: _scored_starts(text.weights, window) for role, text in pools.items()}

    def sample(role: str) -> list[Any]:
        text, starts = pools[role], scored[role]
        picks = torch.randint(0, starts.numel(), (policy.windows_per_step,), generator=gen).tolist()
        return [(text.ids[s:s + window], text.weights[s:s + window]) for s in starts[picks].tolist()]

    was_training = model.training
    requires = {name: p.requires_grad for name, p in model.named_parameters()}
    model.eval()
    model.requires_grad_(False)  # gradients flow to t only
    try:
        merged = MergedParameters(model, base_dir, merge, weights)
        init = min(max(policy.init_t, 1e-4), 1 - 1e-4)
        z = torch.full((len(units),), math.log(init / (1 - init)), dtype=torch.float32, device=device, requires_grad=True)
        optimizer = torch.optim.Adam([z], lr=policy.lr)

        def objective(t, batches) -> tuple[Any, Any, Any]:
            nll = _mean_nlls(model, merged(t), batches)
            general, domain = nll["general"], nll["domain"]
            return general + policy.domain_weight * domain, general, domain

        reported = {role: _windows(_head(text, policy.report_tokens), window) for role, text in pools.items()}

        def reported_objective(t) -> dict[str, float] | None:
            if not policy.report_tokens:
                return None
            with torch.no_grad():
                total, general, domain = objective(t, reported)
            return {"objective": float(total), "general_nll": float(general), "domain_nll": float(domain)}

        before = reported_objective(torch.sigmoid(z.detach()))
        history = []
        for step in range(policy.steps):
            optimizer.zero_grad(set_to_none=True)
            total, general, domain = objective(torch.sigmoid(z), {role: sample(role) for role in pools})
            total.backward()
            optimizer.step()
            total, general, domain = (float(v.detach()) for v in (total, general, domain))
            history.append({"step": step, "objective": total, "general_nll": general, "domain_nll": domain})
            if progress or step % 8 == 0 or step == policy.steps - 1:
                log.info("optimized: step %d/%d objective %.4f (general %.4f, domain %.4f)", step + 1, policy.steps,
                         total, general, domain)
        ts = [round(float(v), 6) for v in torch.sigmoid(z.detach())]
        after = reported_objective(torch.tensor(ts, device=device))
    finally:
        for name, p in model.named_parameters():
            p.requires_grad_(requires[name])
        model.train(was_training)
    tmap = tmap_of(units, ts, policy, n)
    record = {
        "units": [u if isinstance(u, str) else str(u) for u in units],
        "t": ts,
        "kernel": merge.name,
        "calibration": calibration,
        "window": window,
        "tokens_per_step": 2 * window * policy.windows_per_step,
        "before": before,
        "after": after,
        "history": history,
        "seconds": round(time.perf_counter() - start, 3),
    }
    if before is not None:
        log.info("optimized: calibration objective %.4f -> %.4f on %d tokens per corpus", before["objective"],
                 after["objective"], min(policy.report_tokens, *(int(text.ids.numel()) for text in pools.values())))
    log.info("optimized: %d steps of %d tokens in %.1fs; mean t %.3f", policy.steps, record["tokens_per_step"],
             record["seconds"], tmap.mean_t(n))
    return tmap, record
