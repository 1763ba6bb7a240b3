"""Streaming access to HF safetensors checkpoints, one tensor (or tensor pair) at a time.

Analysis and merge compare two checkpoints of the same architecture. Loading both models
would double peak memory; instead tensors are read lazily from memory-mapped safetensors
files, so peak memory stays at a few of the largest tensors whatever the model size.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from spear.errors import SpearError

INDEX_FILE = "model.safetensors.index.json"
# config keys that must agree for two checkpoints to be comparable layer by layer
ARCH_KEYS = ("model_type", "num_hidden_layers", "hidden_size", "intermediate_size", "num_attention_heads")


def _open(path: Path):
    from safetensors import safe_open

    try:
        return safe_open(str(path), framework="pt", device="cpu")
    except Exception as err:  # safetensors raises its own error types for corrupt files
        raise SpearError(
            f"{path} is not a readable safetensors file ({err}); it may be truncated: re-export or copy it again"
        ) from None


class Checkpoint:
    """One HF safetensors checkpoint (single file or sharded), with tensors read on demand."""

    def __init__(self, model_dir: Path) -> None:
        self.dir = Path(model_dir)
        index = self.dir / INDEX_FILE
        if index.exists():
            weight_map: dict[str, str] = json.loads(index.read_text())["weight_map"]
            files = sorted(set(weight_map.values()))
        else:
            files = sorted(p.name for p in self.dir.glob("*.safetensors"))
            if not files:
                raise SpearError(f"{self.dir} holds no *.safetensors weights; point to an HF model dir")
            weight_map = {}
        self._handles = {f: _open(self.dir / f) for f in files}
        if not weight_map:
            weight_map = {name: f for f, h in self._handles.items() for name in h.keys()}
        self.file_of: dict[str, str] = weight_map
        config_path = self.dir / "config.json"
        self.config: dict[str, Any] = json.loads(config_path.read_text()) if config_path.exists() else {}
        self.bytes_read = 0

    @property
    def names(self) -> list[str]:
        return sorted(self.file_of)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._handles[self.file_of[name]].get_slice(name).get_shape())

    def dtype(self, name: str) -> str:
        return self._handles[self.file_of[name]].get_slice(name).get_dtype()

    def get(self, name: str):
        """The tensor ``name`` (a fresh CPU tensor in the stored dtype)."""
        if name not in self.file_of:
            raise SpearError(f"tensor {name} is missing from {self.dir}")
        tensor = self._handles[self.file_of[name]].get_tensor(name)
        self.bytes_read += tensor.numel() * tensor.element_size()
        return tensor

    def text_config(self) -> dict[str, Any]:
        return self.config.get("text_config") or self.config


def check_finite(name: str, tensor, where: Path) -> None:
    import torch

    if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
        raise SpearError(f"tensor {name} in {where} has NaN or Inf values; the checkpoint is corrupt, re-export it")


@dataclass
class TensorPair:
    name: str
    base: Any  # torch.Tensor
    adapted: Any  # torch.Tensor


class TensorPairReader:
    """Matching tensors of a base and an adapted checkpoint, validated up front, read in pairs."""

    def __init__(self, base_dir: Path, adapted_dir: Path, check_values: bool = True) -> None:
        self.base = Checkpoint(base_dir)
        self.adapted = Checkpoint(adapted_dir)
        self.check_values = check_values
        self._check_architecture()
        self._check_names_and_shapes()

    def _check_architecture(self) -> None:
        b, a = self.base.text_config(), self.adapted.text_config()
        diffs = [f"{k}: {b.get(k)} vs {a.get(k)}" for k in ARCH_KEYS if b.get(k) != a.get(k)]
        if diffs:
            raise SpearError(
                f"base {self.base.dir} and adapted {self.adapted.dir} have different architectures "
                f"({'; '.join(diffs)}); compare checkpoints of the same model family and size"
            )

    def _check_names_and_shapes(self) -> None:
        base_names, adapted_names = set(self.base.file_of), set(self.adapted.file_of)
        for missing, where in ((base_names - adapted_names, self.adapted.dir), (adapted_names - base_names, self.base.dir)):
            if missing:
                name = sorted(missing)[0]
                more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
                raise SpearError(f"tensor {name}{more} is missing from {where}; both checkpoints must hold the same tensors")
        for name in sorted(base_names):
            bs, as_ = self.base.shape(name), self.adapted.shape(name)
            if bs != as_:
                raise SpearError(f"tensor {name} has shape {list(bs)} in base but {list(as_)} in adapted; not the same architecture")

    @property
    def names(self) -> list[str]:
        """Tensor names, grouped by the adapted shard they live in (sequential reads)."""
        return sorted(self.adapted.file_of, key=lambda n: (self.adapted.file_of[n], n))

    @property
    def config(self) -> dict[str, Any]:
        return self.adapted.config

    @property
    def bytes_read(self) -> int:
        return self.base.bytes_read + self.adapted.bytes_read

    def read(self, name: str) -> TensorPair:
        base, adapted = self.base.get(name), self.adapted.get(name)
        if self.check_values:
            check_finite(name, base, self.base.dir)
            check_finite(name, adapted, self.adapted.dir)
        return TensorPair(name, base, adapted)

    def iter_pairs(self, names: Iterable[str] | None = None) -> Iterator[TensorPair]:
        for name in self.names if names is None else names:
            yield self.read(name)
