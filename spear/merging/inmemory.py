"""In-memory merging of a loaded adapted model toward a base checkpoint, many times over.

For sweeps (``target_retention``), the posterior impact analysis (restore one layer at a time)
and notebooks: no disk writes, and each :meth:`InMemoryMerger.apply` only touches the
parameters whose ``t`` changed since the previous call. The adapted value of a parameter is
snapshotted (to CPU) the first time it is changed, and the base tensor is read from the base
checkpoint the first time it is needed and then cached on CPU, so memory grows to at most
model + adapted snapshot + base cache, and only for the parameters actually merged.

Results equal the streaming merge (same kernels, same inputs) bit for bit when the model was
loaded in the checkpoint's dtype. Tied parameters (``lm_head`` = ``embed_tokens``) are one
parameter object and are merged once.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from spear.errors import SpearError
from spear.io.reader import ARCH_KEYS, Checkpoint, check_finite
from spear.merging.kernels import acts_at_zero, merge_tensor
from spear.merging.plan import MergePlan, TensorStep, TMap
from spear.runtime import torch_threads

log = logging.getLogger(__name__)


class InMemoryMerger:
    """Merge a loaded ADAPTED ``model`` toward the base checkpoint in ``base_dir``, in place.

    >>> merger = InMemoryMerger(model, base_dir, SlerpMerge())
    >>> merger.apply(TMap.of_layers({3: 1.0}))   # layer 3 restored to the base
    >>> merger.apply(TMap.of_layers({4: 1.0}))   # layer 3 back to adapted, layer 4 restored
    >>> merger.reset()                           # the adapted model again

    ``merge`` is the validated ``merge`` config: kernel, its parameters, ``check_values`` and
    ``threads`` apply here exactly as in the streaming merge. :meth:`apply` can take another
    kernel for one call (a comparison of kernels on one loaded model).
    """

    def __init__(self, model, base_dir: Path, merge) -> None:
        from spear.models.layer_map import layer_map_for

        self.model = model
        self.merge = merge
        self.base = Checkpoint(Path(base_dir))
        self.layer_map = layer_map_for(model.config)
        # unique parameters: a tied lm_head is the embedding's Parameter and is listed once
        self.params = dict(model.named_parameters())
        self._check_against_base()
        self._adapted: dict[str, Any] = {}  # name -> CPU snapshot of the adapted value
        self._base: dict[str, Any] = {}  # name -> CPU base tensor in the parameter's dtype
        self._step: dict[str, TensorStep | None] = dict.fromkeys(self.params)  # None: the adapted value
        self._tmap = TMap()

    @property
    def num_layers(self) -> int:
        return self.layer_map.num_layers

    @property
    def current(self) -> TMap:
        """The TMap the model currently reflects (``TMap()`` = adapted)."""
        return self._tmap

    def _check_against_base(self) -> None:
        config = self.model.config
        text = getattr(config, "text_config", None) or config
        base_cfg = self.base.text_config()
        diffs = [
            f"{k}: {base_cfg.get(k)} vs {getattr(text, k, None)}"
            for k in ARCH_KEYS
            if k in base_cfg and base_cfg.get(k) != getattr(text, k, None)
        ]
        if diffs:
            raise SpearError(
                f"base {self.base.dir} and the loaded model have different architectures ({'; '.join(diffs)}); "
                "compare checkpoints of the same model family and size"
            )
        for name, param in self.params.items():
            if name not in self.base.file_of:
                raise SpearError(f"parameter {name} of the loaded model is missing from {self.base.dir}")
            shape = self.base.shape(name)
            if tuple(shape) != tuple(param.shape):
                raise SpearError(
                    f"tensor {name} has shape {list(shape)} in base but {list(param.shape)} in the model; "
                    "not the same architecture"
                )

    def _adapted_of(self, name: str):
        snap = self._adapted.get(name)
        if snap is None:
            snap = self.params[name].detach().to("cpu", copy=True)
            self._adapted[name] = snap
        return snap

    def _base_of(self, name: str):
        tensor = self._base.get(name)
        if tensor is None:
            tensor = self.base.get(name)
            if self.merge.check_values:
                check_finite(name, tensor, self.base.dir)
            dtype = self.params[name].dtype
            if tensor.dtype != dtype:
                tensor = tensor.to(dtype)
            self._base[name] = tensor
        return tensor

    def plan(self, tmap: TMap, merge=None) -> MergePlan:
        """The merge plan of this model's parameters for ``tmap`` (with ``merge``, else the merger's kernel)."""
        return MergePlan.build(tmap, self.layer_map, self.params, merge or self.merge)

    def apply(self, tmap: TMap, with_stats: bool = False, merge=None) -> dict[str, dict[str, Any]]:
        """Set every parameter to its step of ``tmap``'s plan: ``merge(adapted, base, t)``.

        Only parameters whose step (``t``, kernel, kernel parameters) differs from the current
        state are recomputed; a step that keeps the adapted value copies the snapshot back
        (bit-exact). Returns the stats of the recomputed parameters (``t`` and ``fallback``;
        ``cos``/``angle``/``rel_change`` too with ``with_stats``).
        """
        import torch

        plan = self.plan(tmap, merge)
        stats: dict[str, dict[str, Any]] = {}
        with torch.no_grad(), torch_threads(self.merge.threads):
            for name, param in self.params.items():
                step = plan[name]
                if step.t == 0.0 and not acts_at_zero(step.kernel, step.params):
                    step = None
                if step == self._step[name]:
                    continue
                adapted = self._adapted_of(name)
                if step is None:
                    param.copy_(adapted)
                    st = {"t": 0.0, "fallback": False}
                else:
                    merged, st = merge_tensor(step.kernel, adapted, self._base_of(name), step.t, name=name,
                                              params=step.params, with_stats=with_stats)
                    param.copy_(merged)
                self._step[name] = step
                stats[name] = st
        self._tmap = tmap
        return stats

    def reset(self) -> None:
        """Put the adapted weights back (only those that were changed)."""
        self.apply(TMap())

    def base_tmap(self) -> TMap:
        """The TMap that turns the model into the base model (every tensor ``t=1``)."""
        return TMap.everywhere(self.num_layers, 1.0)

    def release(self) -> None:
        """Reset the model and drop the caches (the merger can still be used afterwards)."""
        self.reset()
        self._adapted.clear()
        self._base.clear()
