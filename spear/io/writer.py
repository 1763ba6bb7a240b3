"""Streaming, sharded safetensors writer (HF layout).

The tensors to write are declared up front (name, dtype, shape), so every shard's header is
known before its first byte of data: each tensor is written to disk as soon as it is produced
and then dropped. Peak memory is therefore one tensor, not one shard, whatever the shard size
or the model size. Shards follow HF's names (``model.safetensors`` for one shard, else
``model-00001-of-0000N.safetensors`` plus ``model.safetensors.index.json``), so
``from_pretrained`` and :class:`spear.io.reader.Checkpoint` read them back.

The writer writes into the directory it is given; make that an :func:`spear.io.atomic.atomic_dir`
so an interrupted write leaves nothing behind.
"""

from __future__ import annotations

import hashlib
import json
import re
import struct
import sys
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from spear.errors import SpearError
from spear.io.dtypes import st_itemsize, torch_to_st_dtype
from spear.io.reader import INDEX_FILE

_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
          "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}  # fmt: skip


def parse_size(size: int | str) -> int:
    """Bytes of a size like ``2GB`` (10^9), ``500MiB`` (2^20), ``"1000"`` or an int."""
    if isinstance(size, bool):
        raise SpearError(f"merge.max_shard_size={size!r} is not a size; use e.g. 2GB, 500MB or a byte count")
    if isinstance(size, (int, float)):
        value = int(size)
    else:
        m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([A-Za-z]*)\s*", str(size))
        unit = m.group(2).upper() if m else None
        if not m or unit not in _UNITS:
            raise SpearError(f"merge.max_shard_size={size!r} is not a size; use e.g. 2GB, 500MB, 1GiB or a byte count")
        value = int(float(m.group(1)) * _UNITS[unit])
    if value <= 0:
        raise SpearError(f"merge.max_shard_size={size!r} must be positive")
    return value


@dataclass(frozen=True)
class TensorSpec:
    """A tensor to be written: name, safetensors dtype (``F32``, ``BF16``, ...) and shape."""

    name: str
    dtype: str
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        n = 1
        for d in self.shape:
            n *= int(d)
        return n * st_itemsize(self.dtype)


def plan_shards(specs: Iterable[TensorSpec], max_bytes: int) -> list[list[TensorSpec]]:
    """Greedy shards in the given order; a tensor larger than ``max_bytes`` gets its own shard."""
    shards: list[list[TensorSpec]] = []
    current: list[TensorSpec] = []
    size = 0
    for spec in specs:
        if current and size + spec.nbytes > max_bytes:
            shards.append(current)
            current, size = [], 0
        current.append(spec)
        size += spec.nbytes
    if current:
        shards.append(current)
    return shards


def _header(specs: list[TensorSpec], metadata: dict[str, str] | None) -> bytes:
    header: dict[str, Any] = {}
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    offset = 0
    for spec in specs:
        header[spec.name] = {"dtype": spec.dtype, "shape": list(spec.shape), "data_offsets": [offset, offset + spec.nbytes]}
        offset += spec.nbytes
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # data starts 8-byte aligned, as safetensors itself writes
    return struct.pack("<Q", len(blob)) + blob


def _raw_bytes(tensor):
    """A zero-copy byte view of a CPU tensor (contiguous copy only if needed)."""
    import torch

    t = tensor.detach()
    if t.device.type != "cpu":
        t = t.cpu()
    t = t.contiguous().reshape(-1)
    if t.dtype == torch.bool:
        t = t.to(torch.uint8)
    return memoryview(t.view(torch.uint8).numpy())


class ShardedSafetensorsWriter:
    """Write declared tensors, in declared order, into HF safetensors shards.

    >>> with ShardedSafetensorsWriter(out_dir, specs, "2GB") as w:
    ...     for spec in specs:
    ...         w.write(spec.name, tensor_for(spec))
    """

    def __init__(
        self,
        out_dir: Path,
        specs: Iterable[TensorSpec],
        max_shard_size: int | str = "2GB",
        metadata: dict[str, str] | None = None,
    ) -> None:
        if sys.byteorder != "little":  # pragma: no cover - safetensors is little-endian
            raise SpearError("the safetensors writer needs a little-endian machine")
        self.out_dir = Path(out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.specs = list(specs)
        names = [s.name for s in self.specs]
        if len(set(names)) != len(names):
            raise SpearError("duplicate tensor names in the output plan")
        self.shards = plan_shards(self.specs, parse_size(max_shard_size))
        n = len(self.shards)
        self.files = ["model.safetensors"] if n <= 1 else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
        self.metadata = {"format": "pt", **(metadata or {})}
        self._queue = [(i, spec) for i, shard in enumerate(self.shards) for spec in shard]
        self._pos = 0
        self._fh = None
        self._shard = -1
        self._digests: dict[str, Any] = {}  # file -> sha256 of what was written, so no one re-reads it to hash it
        self.bytes_written = 0
        self.closed = False

    def __enter__(self) -> ShardedSafetensorsWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        elif self._fh is not None:
            self._fh.close()
            self._fh = None

    @property
    def weight_map(self) -> dict[str, str]:
        return {spec.name: self.files[i] for i, shard in enumerate(self.shards) for spec in shard}

    def _open_shard(self, index: int) -> None:
        if self._fh is not None:
            self._fh.close()
        self._shard = index
        self._fh = open(self.out_dir / self.files[index], "wb")
        self._digests[self.files[index]] = hashlib.sha256()
        self._emit(_header(self.shards[index], self.metadata))

    def _emit(self, data) -> None:
        self._fh.write(data)
        self._digests[self.files[self._shard]].update(data)
        self.bytes_written += len(data)

    def write(self, name: str, tensor) -> None:
        """Write the next declared tensor; its name, dtype and shape must match the plan."""
        if self._pos >= len(self._queue):
            raise SpearError(f"tensor {name} was not declared to the writer")
        shard, spec = self._queue[self._pos]
        if name != spec.name:
            raise SpearError(f"writer expected tensor {spec.name} next, got {name}")
        dtype = torch_to_st_dtype(tensor.dtype)
        if dtype != spec.dtype or tuple(tensor.shape) != tuple(spec.shape):
            raise SpearError(
                f"tensor {name} is {dtype}{list(tensor.shape)} but was declared {spec.dtype}{list(spec.shape)}"
            )
        if shard != self._shard:
            self._open_shard(shard)
        if spec.nbytes:
            self._emit(_raw_bytes(tensor))
        self._pos += 1

    def close(self) -> dict[str, Any]:
        """Finish the last shard and write the index (sharded outputs only)."""
        if self.closed:
            return self.summary()
        if self._pos != len(self._queue):
            missing = self._queue[self._pos][1].name
            raise SpearError(f"writer closed before tensor {missing} (and {len(self._queue) - self._pos - 1} more) was written")
        for index in range(len(self.shards)):  # shards of zero tensors cannot happen; empty plans write one file
            if index > self._shard:
                self._open_shard(index)
        if not self.shards:
            self._shard = 0
            self._fh = open(self.out_dir / self.files[0], "wb")
            self._digests[self.files[0]] = hashlib.sha256()
            self._emit(_header([], self.metadata))
        if self._fh is not None:
            self._fh.close()
            self._fh = None
        if len(self.files) > 1:
            index = {
                "metadata": {"total_size": sum(s.nbytes for s in self.specs)},
                "weight_map": dict(sorted(self.weight_map.items())),
            }
            text = json.dumps(index, indent=2) + "\n"
            (self.out_dir / INDEX_FILE).write_text(text)
            self.bytes_written += len(text.encode())
        self.closed = True
        return self.summary()

    def summary(self) -> dict[str, Any]:
        """Files, bytes and tensors written, and each shard's sha256 (as :func:`spear.io.hashing.file_sha256` gives)."""
        return {"files": list(self.files), "bytes_written": self.bytes_written, "num_tensors": len(self.specs),
                "sha256": {name: digest.hexdigest() for name, digest in self._digests.items()}}
