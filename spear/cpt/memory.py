"""Where a CPT's memory goes: the parts a run must hold, measured, next to its peak RSS.

The parts: what the process held when training started (libraries, the weights, the packed corpus),
the gradients of trainable parameters, the optimizer's state (AdamW: two float32 tensors per trainable
parameter, none for frozen ones) and the activations autograd saves for the backward pass of one
batch, counted exactly with ``torch.autograd.graph.saved_tensors_hooks`` (parameters excluded: they
are the weights). Their sum against the peak RSS shows what is left unexplained (allocator caching
and transient buffers such as the float32 log-softmax of the logits, freed before backward ends).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator
from typing import Any

import torch


def tensor_bytes(tensors: Iterable[torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def optimizer_state_bytes(optimizer) -> int | None:
    """Bytes of the tensors an optimizer keeps per parameter (AdamW: ``exp_avg``, ``exp_avg_sq``, ``step``);
    ``None`` for an optimizer that keeps its state elsewhere (a DeepSpeed engine's partitions)."""
    state = getattr(optimizer, "state", None)
    if not isinstance(state, dict):
        return None
    return tensor_bytes(t for per_param in state.values() for t in per_param.values() if torch.is_tensor(t))


class SavedActivations:
    """Counts the distinct storages autograd saves for backward while active (parameters left out)."""

    def __init__(self, model: torch.nn.Module) -> None:
        self._params = {p.untyped_storage().data_ptr() for p in model.parameters()}
        self._seen: set[int] = set()
        self.bytes = 0

    def _pack(self, tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        ptr = storage.data_ptr()
        if ptr not in self._params and ptr not in self._seen:
            self._seen.add(ptr)
            self.bytes += storage.nbytes()
        return tensor

    @contextlib.contextmanager
    def counting(self) -> Iterator[None]:
        with torch.autograd.graph.saved_tensors_hooks(self._pack, lambda tensor: tensor):
            yield


def memory_account(model: torch.nn.Module, optimizer, *, rss_at_start: int | None, activation_bytes: int | None,
                   peak_rss: int) -> dict[str, Any]:
    """The parts of a finished CPT's memory and what its peak RSS leaves unexplained (bytes)."""
    params = list(model.parameters())
    trainable = [p for p in params if p.requires_grad]
    parts = {
        "rss_at_start_bytes": rss_at_start,  # libraries, weights, corpus: what training started from
        "weights_bytes": tensor_bytes(params),
        "grad_bytes": tensor_bytes(trainable),
        "optimizer_state_bytes": optimizer_state_bytes(optimizer),
        "activation_bytes": activation_bytes,  # saved for backward, one batch
        "peak_rss_bytes": peak_rss,
    }
    added = [parts["grad_bytes"], parts["optimizer_state_bytes"], parts["activation_bytes"], rss_at_start]
    if all(v is not None for v in added):
        parts["expected_peak_bytes"] = sum(added)
        parts["unexplained_bytes"] = peak_rss - parts["expected_peak_bytes"]
    return parts
