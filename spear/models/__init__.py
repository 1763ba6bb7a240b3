"""Model references, loading, and the per-family layer map."""

from spear.models.layer_map import FAMILIES, LayerMap, MatrixRef, layer_map_for
from spear.models.loading import known_aliases, load_model, resolve_model_dir

__all__ = [
    "FAMILIES",
    "LayerMap",
    "MatrixRef",
    "known_aliases",
    "layer_map_for",
    "load_model",
    "resolve_model_dir",
]
