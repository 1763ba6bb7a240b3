"""Which tensors belong to which decoder layer, per architecture family (a data table).

Analysis, freezing and merging all need to know "tensor name -> (layer, module)". Families
differ only in data (prefixes, module names), so each family is one entry of ``FAMILIES``;
supporting a new architecture means adding an entry, not code.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

from spear.errors import SpearError

# The projection matrices of a Llama-style decoder layer and the group each belongs to.
LLAMA_STYLE_MODULES: dict[str, str] = {
    "self_attn.q_proj": "attn",
    "self_attn.k_proj": "attn",
    "self_attn.v_proj": "attn",
    "self_attn.o_proj": "attn",
    "mlp.gate_proj": "mlp",
    "mlp.up_proj": "mlp",
    "mlp.down_proj": "mlp",
}

# Decoder layers of causal LMs, and of multimodal wrappers (Gemma3) around one.
TEXT_LAYERS_PREFIX = r"(?:model\.language_model\.|language_model\.model\.|model\.)layers\."


@dataclass(frozen=True)
class FamilySpec:
    """One architecture family: the ``model_type`` values it covers and its tensor naming."""

    name: str
    model_types: tuple[str, ...]
    layers_prefix: str = TEXT_LAYERS_PREFIX
    modules: dict[str, str] = field(default_factory=lambda: dict(LLAMA_STYLE_MODULES))


FAMILIES: tuple[FamilySpec, ...] = (
    FamilySpec("llama", ("llama",)),
    FamilySpec("mistral", ("mistral",)),
    FamilySpec("qwen2", ("qwen2",)),
    FamilySpec("qwen3", ("qwen3",)),
    FamilySpec("gemma", ("gemma", "gemma2", "gemma3", "gemma3_text")),
)

# The module groups ("attn", "mlp"), in table order: what group-level scores, masks and merges range over.
GROUPS: tuple[str, ...] = tuple(dict.fromkeys(g for spec in FAMILIES for g in spec.modules.values()))


@dataclass(frozen=True)
class MatrixRef:
    """A 2-D weight matrix of a decoder layer."""

    layer: int
    module: str  # e.g. "self_attn.q_proj"
    group: str  # "attn" or "mlp"


class LayerMap:
    """Maps tensor names of one architecture to decoder layers and modules (anchored regexes)."""

    def __init__(self, spec: FamilySpec, num_layers: int) -> None:
        self.family = spec.name
        self.num_layers = num_layers
        self.modules = dict(spec.modules)
        self._layer_re = re.compile(rf"^{spec.layers_prefix}(\d+)\.")
        alternatives = "|".join(re.escape(m) for m in sorted(spec.modules))
        self._matrix_re = re.compile(rf"^{spec.layers_prefix}(\d+)\.({alternatives})\.weight$")
        self.layers_prefix = spec.layers_prefix

    def layer_of(self, name: str) -> int | None:
        """Decoder layer of any tensor (matrices, norms, biases); ``None`` for non-layer tensors."""
        m = self._layer_re.match(name)
        return int(m.group(1)) if m else None

    def matrix_of(self, name: str) -> MatrixRef | None:
        """The layer matrix a tensor name denotes, or ``None`` if it is not one."""
        m = self._matrix_re.match(name)
        if not m:
            return None
        module = m.group(2)
        return MatrixRef(layer=int(m.group(1)), module=module, group=self.modules[module])

    def matrix_regex(self, layer: int, module: str | None = None) -> str:
        """Anchored regex for a layer's matrices (all, or one module): for trainer configs."""
        mod = re.escape(module) if module else "(?:" + "|".join(re.escape(m) for m in sorted(self.modules)) + ")"
        return rf"^{self.layers_prefix}{layer}\.{mod}\.weight$"


def _text_config(config: Any) -> Any:
    return getattr(config, "text_config", None) or config


def layer_map_for(config: Any) -> LayerMap:
    """The layer map for a transformers config (or anything with ``model_type``)."""
    model_type = getattr(config, "model_type", None)
    text_cfg = _text_config(config)
    for spec in FAMILIES:
        if model_type in spec.model_types or getattr(text_cfg, "model_type", None) in spec.model_types:
            return LayerMap(spec, int(text_cfg.num_hidden_layers))
    known = sorted(t for s in FAMILIES for t in s.model_types)
    raise SpearError(
        f"unsupported architecture model_type={model_type!r} (known: {', '.join(known)}); "
        "add a FamilySpec entry for it to FAMILIES in spear/models/layer_map.py"
    )
