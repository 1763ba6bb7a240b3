"""The one table of safetensors dtypes (``F32``, ``BF16``, ...): their torch dtypes and sizes.

Torch dtypes are named, not imported, so header readers and planners stay torch-free; the
functions below import torch only when asked for a torch dtype.
"""

from __future__ import annotations

from typing import Any

from spear.errors import SpearError

# safetensors dtype -> (torch dtype attribute, bytes per element)
ST_DTYPES: dict[str, tuple[str, int]] = {
    "F64": ("float64", 8), "F32": ("float32", 4), "F16": ("float16", 2), "BF16": ("bfloat16", 2),
    "F8_E4M3": ("float8_e4m3fn", 1), "F8_E5M2": ("float8_e5m2", 1),
    "I64": ("int64", 8), "I32": ("int32", 4), "I16": ("int16", 2), "I8": ("int8", 1),
    "U64": ("uint64", 8), "U32": ("uint32", 4), "U16": ("uint16", 2), "U8": ("uint8", 1), "BOOL": ("bool", 1),
}  # fmt: skip


def st_itemsize(st_dtype: str) -> int:
    """Bytes per element of a safetensors dtype (shard sizes are planned before any tensor exists)."""
    if st_dtype not in ST_DTYPES:
        raise SpearError(f"safetensors dtype {st_dtype} is not supported by spear; use one of {', '.join(ST_DTYPES)}")
    return ST_DTYPES[st_dtype][1]


def st_to_torch_dtype(st_dtype: str) -> Any:
    """The torch dtype of a safetensors dtype, or ``None`` where this torch has none (read it via safetensors)."""
    import torch

    attr = ST_DTYPES.get(st_dtype, ("", 0))[0]
    return getattr(torch, attr, None) if attr else None


def torch_to_st_dtype(dtype: Any) -> str:
    """The safetensors name of a torch dtype (what a written header must say)."""
    import torch

    for name, (attr, _) in ST_DTYPES.items():
        if getattr(torch, attr, None) == dtype:
            return name
    raise SpearError(f"dtype {dtype} cannot be stored in safetensors by spear")
