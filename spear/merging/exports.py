"""Exports of a merge for other tools: an equivalent mergekit config (``mergekit.yaml``).

Direction of ``t``: spear's ``t=0`` keeps the ADAPTED tensor and ``t=1`` returns the base one,
while mergekit's slerp ``t=0`` returns its ``base_model``. The export therefore names the
**adapted** model as mergekit's ``base_model`` (and first model) and uses spear's ``t`` as is, so
``mergekit slerp(t, adapted, base)`` is the same formula as spear's.

Per-layer values are gradient lists of exactly ``num_hidden_layers`` entries (mergekit evaluates
a list at ``layer / (num_layers - 1)``, which picks entry ``layer`` exactly), selected by
``filter`` (a substring of the tensor name; the first matching filter wins):
``self_attn`` / ``mlp`` lists with module granularity, then ``layers.`` (every other tensor of a
decoder layer), then an unfiltered scalar, ``non_layer_t``, for embeddings, final norm and
lm_head (mergekit evaluates those at gradient position 0, hence the explicit scalar).

Exactness: mergekit computes in float32 (``dtype: float32``) and writes the adapted dtype
(``out_dtype``). Its slerp always falls back to linear interpolation when ``|cos| > 0.9995``
(hard-coded), which spear does only with ``merge.dot_threshold=0.9995``; with the default (no
threshold) the two differ by O(angle^2) on nearly parallel tensors, well below float tolerance
of a float32 model. ``ties``/``dare`` exports use ``density = 1`` (nothing trimmed) on layers
with ``t = 0``, where spear keeps the adapted tensor; mergekit's DARE draws its own random mask.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from spear.io.atomic import write_text_atomic
from spear.io.dtypes import ST_DTYPES
from spear.merging.plan import TMap
from spear.models.layer_map import GROUPS

MERGEKIT_OUT_DTYPES = ("float32", "bfloat16", "float16")  # what mergekit writes; others (F64) as float32
GROUP_FILTERS = {"attn": "self_attn", "mlp": "mlp"}


def _layer_values(tmap: TMap, num_layers: int, group: str | None = None) -> list[float]:
    out = []
    for layer in range(num_layers):
        if group is not None and tmap.group_t and (layer, group) in tmap.group_t:
            out.append(float(tmap.group_t[(layer, group)]))
        else:
            out.append(float(tmap.layer_t.get(layer, 0.0)))
    return out


def _setting(tmap: TMap, num_layers: int, transform=lambda v: v, non_layer=None) -> list[dict[str, Any]]:
    """Filtered gradient lists of ``transform(t)`` per layer, then the non-layer scalar."""
    entries: list[dict[str, Any]] = []
    if tmap.group_t:
        for group in GROUPS:
            if any(g == group for _, g in tmap.group_t):
                values = [transform(v) for v in _layer_values(tmap, num_layers, group)]
                entries.append({"filter": GROUP_FILTERS[group], "value": values})
    entries.append({"filter": "layers.", "value": [transform(v) for v in _layer_values(tmap, num_layers)]})
    entries.append({"value": transform(tmap.non_layer_t) if non_layer is None else non_layer})
    return entries


# spear kernel -> mergekit merge_method
MERGEKIT_METHODS = {"slerp": "slerp", "linear": "linear", "task_arithmetic": "task_arithmetic", "ties": "ties",
                    "dare": "dare_linear"}


def mergekit_config(
    tmap: TMap,
    *,
    base: str,
    adapted: str,
    num_layers: int,
    kernel: str = "slerp",
    kernel_params: dict[str, Any] | None = None,
    out_dtype: str = "F32",
) -> dict[str, Any] | None:
    """A mergekit config dict that reproduces spear's merge of ``adapted`` toward ``base``
    (``None`` for a kernel mergekit does not have: ``dg_hard``)."""
    if kernel not in MERGEKIT_METHODS:
        return None
    params = dict(kernel_params or {})
    base, adapted = str(base), str(adapted)
    cfg: dict[str, Any]
    if kernel == "slerp":
        cfg = {
            "merge_method": "slerp",
            "base_model": adapted,
            "models": [{"model": adapted}, {"model": base}],
            "parameters": {"t": _setting(tmap, num_layers)},
        }
    elif kernel == "linear":
        cfg = {
            "merge_method": "linear",
            "models": [
                {"model": adapted, "parameters": {"weight": _setting(tmap, num_layers, lambda v: 1.0 - v)}},
                {"model": base, "parameters": {"weight": _setting(tmap, num_layers)}},
            ],
            "parameters": {"normalize": False},
        }
    else:  # single-delta methods: base_model = base, one model = adapted with weight 1 - t
        method = MERGEKIT_METHODS[kernel]
        model_params: dict[str, Any] = {"weight": _setting(tmap, num_layers, lambda v: 1.0 - v)}
        if kernel in ("ties", "dare"):
            density = float(params.get("density", 0.2))
            model_params["density"] = _setting(
                tmap, num_layers, lambda v: density if v > 0 else 1.0, density if tmap.non_layer_t > 0 else 1.0
            )
        cfg = {
            "merge_method": method,
            "base_model": base,
            "models": [{"model": adapted, "parameters": model_params}],
            "parameters": {"normalize": False},
        }
    cfg["dtype"] = "float32"
    name = ST_DTYPES.get(out_dtype, ("float32", 4))[0]
    cfg["out_dtype"] = name if name in MERGEKIT_OUT_DTYPES else "float32"
    cfg["tokenizer_source"] = adapted
    return cfg


def mergekit_yaml(cfg: dict[str, Any], *, kernel: str = "slerp", dot_threshold: float | None = None) -> str:
    import yaml

    lines = [
        "# mergekit config equivalent to this spear merge: `mergekit-yaml mergekit.yaml OUT_DIR`",
        "# spear t=0 keeps the adapted model, t=1 returns the base; mergekit's t=0 returns its",
        "# base_model, so for slerp base_model is the ADAPTED model and t is used as is.",
        "# Per-layer lists have one entry per decoder layer (layer 0 first); the unfiltered",
        "# value is policy.non_layer_t (embeddings, final norm, lm_head).",
    ]
    if kernel == "slerp":
        exact = "exactly (float tolerance)" if dot_threshold == 0.9995 else "within float tolerance"
        lines.append(f"# mergekit lerps when |cos| > 0.9995; spear merge.dot_threshold={dot_threshold}: matches {exact}.")
    if kernel == "dare":
        lines.append("# mergekit's DARE draws its own random mask: same distribution, not the same tensors.")
    return "\n".join(lines) + "\n" + yaml.safe_dump(cfg, sort_keys=False, default_flow_style=None, width=120)


def write_mergekit_yaml(path: Path, cfg: dict[str, Any], **kwargs: Any) -> Path:
    return write_text_atomic(Path(path), mergekit_yaml(cfg, **kwargs))
