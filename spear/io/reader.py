"""Streaming access to HF safetensors checkpoints, one tensor (or tensor pair) at a time.

Analysis and merge compare two checkpoints of the same architecture. Loading both models
would double peak memory; instead tensors are read on demand, so peak memory stays at a few
of the largest tensors whatever the model size. Tensor bytes are read with ``pread`` into
fresh tensors (or straight into a batch stack) at the offsets of the safetensors header, not
through a memory map: touched pages of a map count in the process RSS until it is closed,
which over a whole model would amount to holding it.
"""

from __future__ import annotations

import contextlib
import json
import os
import struct
import sys
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from spear.errors import SpearError
from spear.io.dtypes import st_to_torch_dtype

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


@contextlib.contextmanager
def low_heap_retention(mmap_threshold: int = 1 << 20, restore_to: int = 32 << 20) -> Iterator[None]:
    """Let freed tensors of ``mmap_threshold`` bytes or more go back to the OS (glibc only).

    glibc raises its mmap threshold dynamically (up to 32 MiB) once large blocks are freed, after
    which streamed tensors come from per-thread heap arenas that keep their pages: a stream of
    same-size tensors then costs ~1.5x its working set in RSS. Inside the block the threshold is
    fixed at ``mmap_threshold``; on exit it is set to ``restore_to`` (glibc's dynamic ceiling).
    A no-op where ``mallopt`` is unavailable.
    """
    mallopt = None
    try:
        import ctypes
        import ctypes.util

        if sys.platform.startswith("linux"):
            libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
            mallopt = getattr(libc, "mallopt", None)
    except OSError:
        mallopt = None
    m_mmap_threshold = -3
    if mallopt is not None:
        mallopt(m_mmap_threshold, int(mmap_threshold))
    try:
        yield
    finally:
        if mallopt is not None:
            mallopt(m_mmap_threshold, int(restore_to))


def _read_layout(path: Path) -> dict[str, tuple[str, tuple[int, ...], int, int]]:
    """``name -> (dtype, shape, absolute begin, absolute end)`` from a safetensors header."""
    size = path.stat().st_size
    with open(path, "rb") as fh:
        head = fh.read(8)
        if len(head) < 8:
            raise SpearError(f"{path} is not a readable safetensors file (no header); it may be truncated: re-export or copy it again")
        (n,) = struct.unpack("<Q", head)
        if n > size - 8:
            raise SpearError(f"{path} is not a readable safetensors file (header past the end); it may be truncated: re-export or copy it again")
        header = json.loads(fh.read(n))
    data_start = 8 + n
    layout = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        begin, end = info["data_offsets"]
        if data_start + end > size:
            raise SpearError(f"{path}: tensor {name} ends past the end of the file; it is truncated: re-export or copy it again")
        layout[name] = (info["dtype"], tuple(info["shape"]), data_start + begin, data_start + end)
    return layout


def _pread_into(fd: int, buf: memoryview, offset: int) -> None:
    done = 0
    while done < len(buf):
        got = os.preadv(fd, [buf[done:]], offset + done)
        if got <= 0:
            raise SpearError(f"unexpected end of file while reading at offset {offset + done}; the checkpoint is truncated")
        done += got


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
        self._handles = {f: _open(self.dir / f) for f in files}  # validates each file; tensors are read by pread
        self._layout = {f: _read_layout(self.dir / f) for f in files}
        self._fds: dict[str, int] = {}
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
        return self._entry(name)[1]

    def dtype(self, name: str) -> str:
        return self._entry(name)[0]

    def _entry(self, name: str) -> tuple[str, tuple[int, ...], int, int]:
        if name not in self.file_of:
            raise SpearError(f"tensor {name} is missing from {self.dir}")
        entry = self._layout[self.file_of[name]].get(name)
        if entry is None:
            raise SpearError(f"tensor {name} is listed in {self.dir / INDEX_FILE} but missing from {self.file_of[name]}; re-export the checkpoint")
        return entry

    def _fd(self, file: str) -> int:
        if file not in self._fds:
            self._fds[file] = os.open(self.dir / file, os.O_RDONLY)
        return self._fds[file]

    def _read_into(self, name: str, out) -> None:
        """Read ``name``'s bytes into the contiguous CPU tensor ``out`` of its dtype and shape."""
        _, _, begin, end = self._entry(name)
        buf = memoryview(out.reshape(-1).view(torch_uint8()).numpy())
        if len(buf) != end - begin:
            raise SpearError(f"tensor {name} in {self.dir} has {end - begin} bytes, expected {len(buf)}; the file is corrupt")
        _pread_into(self._fd(self.file_of[name]), buf, begin)
        self.bytes_read += end - begin

    def get(self, name: str):
        """The tensor ``name`` (a fresh CPU tensor in the stored dtype)."""
        import torch

        dtype, shape, _, _ = self._entry(name)
        torch_dtype = st_to_torch_dtype(dtype)
        if torch_dtype is None:
            return self._handles[self.file_of[name]].get_tensor(name)  # exotic dtype: let safetensors read it
        tensor = torch.empty(shape, dtype=torch_dtype)
        if tensor.numel():
            self._read_into(name, tensor)
        return tensor

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:
            pass

    def text_config(self) -> dict[str, Any]:
        return self.config.get("text_config") or self.config

    def get_stack(self, names: list[str], dtype: Any = None, check_values: bool = False, out: Any = None):
        """Same-shape tensors ``names`` stacked into one ``[len(names), *shape]`` tensor.

        Filled one tensor at a time, read straight into the stack when the stored dtype is the
        wanted one. ``dtype`` defaults to the stored dtype (``torch.float32`` is what spectra
        want). ``out``: a contiguous buffer ``[>= len(names), *shape]`` to fill and return a
        prefix of (reusing one buffer across batches saves allocations and page faults).
        """
        import torch

        if not names:
            raise ValueError("get_stack needs at least one name")
        stored, shape, _, _ = self._entry(names[0])
        stored_dtype = st_to_torch_dtype(stored)
        if out is None:
            out = torch.empty((len(names), *shape), dtype=dtype or stored_dtype or torch.float32)
        else:
            if tuple(out.shape[1:]) != tuple(shape) or out.shape[0] < len(names) or not out.is_contiguous():
                raise ValueError(f"get_stack: buffer of shape {list(out.shape)} cannot hold {len(names)} x {list(shape)}")
            out = out[: len(names)]
        for i, name in enumerate(names):
            if self.shape(name) != shape:
                raise ValueError(f"get_stack: {name} has shape {list(self.shape(name))}, not {list(shape)}")
            if self.dtype(name) == stored and stored_dtype == out.dtype:
                self._read_into(name, out[i])  # straight into the stack, no copy
            else:
                out[i].copy_(self.get(name))
        if check_values:
            check_stack_finite(names, out, self.dir)
        return out


def torch_uint8():
    import torch

    return torch.uint8


def check_stack_finite(names: list[str], stack, where: Path) -> None:
    """``check_finite`` for a stack ``[len(names), ...]``, naming the first bad tensor."""
    import math

    if not stack.is_floating_point() or math.isfinite(float(stack.sum())):
        return
    for name, tensor in zip(names, stack, strict=True):
        check_finite(name, tensor, where)


def check_finite(name: str, tensor, where: Path) -> None:
    """Raise a SpearError if ``tensor`` holds NaN or Inf (a cheap sum first, exact check only if it fails)."""
    import math

    import torch

    if not tensor.is_floating_point() or tensor.numel() == 0:
        return
    # a finite sum proves every element finite; a non-finite one may be overflow, so check exactly
    if math.isfinite(float(tensor.sum())) or bool(torch.isfinite(tensor).all()):
        return
    raise SpearError(f"tensor {name} in {where} has NaN or Inf values; the checkpoint is corrupt, re-export it")


def plan_batches(
    names: Iterable[str], shape_of: Any, max_bytes: int = 64 << 20, element_bytes: int = 4
) -> list[list[str]]:
    """Group ``names`` into same-shape batches of at most ``max_bytes`` each (at least one tensor).

    ``shape_of(name) -> shape``. Shapes come in order of first appearance and names keep their
    order within a shape, so the plan is deterministic for a given name order.
    """
    groups: dict[tuple[int, ...], list[str]] = {}
    for name in names:
        groups.setdefault(tuple(shape_of(name)), []).append(name)
    plan: list[list[str]] = []
    for shape, group in groups.items():
        numel = 1
        for d in shape:
            numel *= d
        per = max(1, int(max_bytes // max(1, numel * element_bytes)))
        plan.extend(group[i : i + per] for i in range(0, len(group), per))
    return plan


@dataclass
class PairBatch:
    """Same-shape tensors of both checkpoints, stacked: ``base[i]``/``adapted[i]`` is ``names[i]``."""

    names: list[str]
    base: Any  # torch.Tensor [B, *shape]
    adapted: Any  # torch.Tensor [B, *shape]


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

    def plan_batches(self, names: Iterable[str] | None = None, max_bytes: int = 64 << 20) -> list[list[str]]:
        """Same-shape batches of ``names`` (default: all), each at most ``max_bytes`` per model in float32."""
        return plan_batches(self.names if names is None else names, self.base.shape, max_bytes)

    def read_batch(
        self, names: list[str], dtype: Any = None, check_values: bool | None = None, out: tuple[Any, Any] | None = None
    ) -> PairBatch:
        """One planned batch, stacked per model (``dtype`` default float32), validated like ``read``.

        ``check_values`` overrides the reader's setting (a caller that checks the values more
        cheaply itself passes ``False``); ``out`` = (base buffer, adapted buffer), see ``get_stack``.
        """
        import torch

        dtype = dtype or torch.float32
        check = self.check_values if check_values is None else check_values
        base = self.base.get_stack(names, dtype, check, None if out is None else out[0])
        adapted = self.adapted.get_stack(names, dtype, check, None if out is None else out[1])
        return PairBatch(list(names), base, adapted)
