"""Streaming merge of two HF safetensors checkpoints into a new HF model dir.

Tensor pairs are read one at a time (:class:`spear.io.reader.TensorPairReader`: validated
names, shapes, architecture, finite values), merged by their step of the
:class:`~spear.merging.plan.MergePlan` (built once from the ``TMap``), and written straight into shards
(:class:`spear.io.writer.ShardedSafetensorsWriter`), so peak memory is a few tensors whatever
the model size. Everything goes into a temporary sibling that is renamed at the end
(:func:`spear.io.atomic.atomic_dir`): an interrupted merge leaves no output, and the next run
cleans up after it.

The merged tensors keep the adapted checkpoint's names, dtypes and tensor set, so tied weights
stay tied: an HF checkpoint of a tied model stores no ``lm_head`` (the config's
``tie_word_embeddings`` re-ties it on load), and if one is stored anyway it takes the same
``t`` as the embeddings (both are non-layer tensors) and so stays equal to them.
"""

from __future__ import annotations

import logging
import shutil
import time
from concurrent.futures import ThreadPoolExecutor, wait
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from spear.errors import SpearError
from spear.io.atomic import atomic_dir, check_output_free
from spear.io.reader import INDEX_FILE, TensorPairReader
from spear.io.writer import ShardedSafetensorsWriter, TensorSpec
from spear.merging.kernels import merge_tensor
from spear.merging.plan import MergePlan, TMap
from spear.runtime import peak_rss_bytes, torch_threads

log = logging.getLogger(__name__)

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".pkl", ".gguf")
# a dir holding one of these has a tokenizer; the merged model takes the adapted model's, else the base's
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


def config_namespace(config: dict[str, Any]) -> SimpleNamespace:
    """A ``config.json`` dict as an attribute object (nested ``text_config`` too), for ``layer_map_for``."""
    ns = SimpleNamespace(**config)
    if isinstance(config.get("text_config"), dict):
        ns.text_config = SimpleNamespace(**config["text_config"])
    return ns


def layer_map_of_dir_config(config: dict[str, Any]):
    from spear.models.layer_map import layer_map_for

    return layer_map_for(config_namespace(config))


def has_tokenizer(model_dir: Path) -> bool:
    return any((Path(model_dir) / name).is_file() for name in TOKENIZER_FILES)


def copy_tokenizer(src: Path, dst: Path) -> list[str]:
    """Copy the tokenizer files of ``src`` (``tokenizer*``, ``special_tokens_map.json``, vocab/merges)."""
    copied = []
    for path in sorted(Path(src).iterdir()):
        if path.is_file() and (path.name.startswith("tokenizer") or path.name in ("special_tokens_map.json", "vocab.json",
                                                                                  "merges.txt", "added_tokens.json")):
            shutil.copy2(path, dst / path.name)
            copied.append(path.name)
    return copied


CODE_SUFFIXES = (".py",)


def copy_aux_files(src: Path, dst: Path, *, copy_code: bool = False) -> tuple[list[str], list[str]]:
    """Copy config, generation config and tokenizer files (everything but weights and hidden files).

    A model's own Python code (``auto_map`` modelling files) travels only with ``copy_code``
    (``model.trust_remote_code=true``): a merged dir never carries code its user did not opt into.
    Returns (copied, code files left out)."""
    copied, left_out = [], []
    for path in sorted(Path(src).iterdir()):
        if not path.is_file() or path.name.startswith(".") or path.name == INDEX_FILE:
            continue
        if path.suffix in WEIGHT_SUFFIXES or path.name.endswith(".index.json"):
            continue
        if path.suffix in CODE_SUFFIXES and not copy_code:
            left_out.append(path.name)
            continue
        shutil.copy2(path, dst / path.name)
        copied.append(path.name)
    return copied, left_out


class _Scratch:
    """Reusable result buffers (per dtype and slot), as large as the largest float tensor so far.

    A merged tensor is being written while the next one is computed, so two slots suffice;
    reusing them spares the page faults of a fresh allocation per large tensor.
    """

    def __init__(self) -> None:
        self.buffers: dict[Any, Any] = {}

    def get(self, like, slot: int = 0):
        import torch

        if not like.is_floating_point():
            return None
        key = (like.dtype, slot)
        buf = self.buffers.get(key)
        if buf is None or buf.numel() < like.numel():
            self.buffers.pop(key, None)
            buf = torch.empty(like.numel(), dtype=like.dtype)
            self.buffers[key] = buf
        return buf


def merge_checkpoints(
    base_dir: Path,
    adapted_dir: Path,
    out_dir: Path,
    tmap: TMap,
    merge,
    *,
    overwrite: bool = False,
    progress: bool = True,
    on_tensor=None,
    copy_code: bool = False,
) -> dict[str, Any]:
    """Merge ``adapted_dir`` toward ``base_dir`` by ``tmap`` and the ``merge`` config into the HF dir ``out_dir``.

    Returns ``{"plan", "tensors": {name: stats}, "layer_t", "bytes_read", "bytes_written",
    "seconds", "peak_rss_bytes", "files", "num_layers", "tokenizer_from"}``. The output takes the
    adapted model's config and tokenizer; an adapted dir without a tokenizer gets the base's (said in
    ``tokenizer_from``), and two dirs without one are an error before anything is read. ``on_tensor(name)`` is called after each
    tensor is handed to the writer (a hook for progress reporting and for tests that interrupt the
    merge). Writing overlaps the next tensor's read and merge (one background write in flight).
    """
    start = time.perf_counter()
    out_dir = Path(out_dir)
    check_output_free(out_dir, overwrite)  # fail before reading anything
    tokenizer_from = "adapted" if has_tokenizer(adapted_dir) else "base" if has_tokenizer(base_dir) else None
    if tokenizer_from is None:
        raise SpearError(f"neither {adapted_dir} nor {base_dir} holds a tokenizer; copy the base model's tokenizer files "
                         "into the adapted dir (a merged model without one cannot be used)")
    # values are checked by the kernel from the sums of squares it computes anyway (no extra pass)
    reader = TensorPairReader(Path(base_dir), Path(adapted_dir), check_values=False)
    layer_map = layer_map_of_dir_config(reader.config)
    plan = MergePlan.build(tmap, layer_map, reader.names, merge)
    specs = [TensorSpec(n, reader.adapted.dtype(n), reader.adapted.shape(n)) for n in plan]
    tensors: dict[str, dict[str, Any]] = {}
    labels = (str(adapted_dir), str(base_dir))
    scratch = _Scratch()
    iterator: Any = list(plan)
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(iterator, desc="merge", unit="tensor", leave=False)
        iterator = bar
    with atomic_dir(out_dir, overwrite=overwrite) as tmp, torch_threads(merge.threads):
        with ShardedSafetensorsWriter(tmp, specs, merge.max_shard_size) as writer, ThreadPoolExecutor(1) as pool:
            # one write in flight while the next tensor is read and merged (double-buffered scratch)
            pending = None
            try:
                for i, name in enumerate(iterator):
                    pair = reader.read(name)
                    step = plan[name]
                    merged, stats = merge_tensor(
                        step.kernel, pair.adapted, pair.base, step.t, name=name, params=step.params,
                        check_finite=merge.check_values, labels=labels, out=scratch.get(pair.adapted, i % 2),
                    )  # fmt: skip
                    tensors[name] = stats
                    del pair
                    if pending is not None:
                        pending.result()
                    pending = pool.submit(writer.write, name, merged)
                    del merged
                    if on_tensor is not None:
                        on_tensor(name)
                if pending is not None:
                    pending.result()
                    pending = None
            finally:
                if pending is not None:  # failing: let the in-flight write finish before cleanup
                    wait([pending])
            summary = writer.close()
        copied, code_left_out = copy_aux_files(Path(adapted_dir), tmp, copy_code=copy_code)
        if code_left_out:
            log.warning("merge: %s holds Python code (%s) that the merged dir does not get; set model.trust_remote_code=true "
                        "to copy it", adapted_dir, ", ".join(code_left_out))
        if tokenizer_from == "base":
            log.warning("merge: %s has no tokenizer; the merged model gets the base model's (%s)", adapted_dir, base_dir)
            copy_tokenizer(Path(base_dir), tmp)
    if bar is not None:
        bar.close()
    return {
        "plan": plan,
        "tokenizer_from": tokenizer_from,
        "code_files": {"copied": [n for n in copied if n.endswith(CODE_SUFFIXES)], "left_out": code_left_out},
        "tensors": tensors,
        "layer_t": plan.layer_t(),
        "num_layers": layer_map.num_layers,
        "bytes_read": reader.bytes_read,
        "bytes_written": summary["bytes_written"],
        "files": summary["files"],
        "sha256": summary["sha256"],
        "seconds": time.perf_counter() - start,
        "peak_rss_bytes": peak_rss_bytes(),
    }
