"""Where and how things run: the compute device, torch's thread count, peak memory.

Torch is imported inside the functions, so importing this module (and ``spear``) stays light.
"""

from __future__ import annotations

import contextlib
import resource
import sys
from collections.abc import Iterator

from spear.errors import SpearError

_DEVICE_PREFIXES = ("cpu", "cuda", "mps")


def resolve_device(name: str | None, key: str = "device") -> str:
    """The torch device for a ``device`` config value: ``auto``/None -> cuda if available, else cpu.

    A CUDA device on a machine without CUDA is refused up front (one line naming ``key``), not
    deep inside a model load; names other than cpu/cuda/mps are refused as typos.
    """
    import torch

    name = str(name or "auto")
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise SpearError(f"{key}={name!r} but CUDA is not available; use {key}=cpu or {key}=auto")
    if not name.startswith(_DEVICE_PREFIXES):
        raise SpearError(f"{key}={name!r} is unknown; use auto, {', '.join(_DEVICE_PREFIXES)} (or cuda:N)")
    return name


def _proc_status_bytes(field: str) -> int | None:
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def peak_rss_bytes() -> int:
    """Peak resident set size of this process so far.

    Linux: ``VmHWM`` of ``/proc/self/status`` (this process's own high-water mark; ``ru_maxrss``
    would carry a big parent's peak across fork + exec); elsewhere ``ru_maxrss``.
    """
    peak = _proc_status_bytes("VmHWM")
    if peak is not None:
        return peak
    peak = int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
    return peak if sys.platform == "darwin" else peak * 1024


def rss_bytes() -> int | None:
    """Resident set size of this process now (``VmRSS``; ``None`` where /proc is missing)."""
    return _proc_status_bytes("VmRSS")


@contextlib.contextmanager
def torch_threads(n: int | None) -> Iterator[None]:
    """Run the block with ``n`` torch intra-op threads (``None``/0: leave the setting alone).

    The kernels are memory-bound chunk loops; with several threads every small op is a
    parallel region, which on a shared or oversubscribed CPU waits for descheduled threads
    (measured: 3-30x slower than one thread on a busy 2-core machine).
    """
    import torch

    old = torch.get_num_threads()
    if not n or int(n) == old:
        yield
        return
    torch.set_num_threads(int(n))
    try:
        yield
    finally:
        torch.set_num_threads(old)
