"""LightningDataModule over a packed corpus, with a deterministic and resumable data order.

* Split: blocks are assigned to train/validation by a seeded permutation (``data.split_seed``),
  so the split depends only on the corpus, the tokenizer, ``block_size`` and the seed.
* Order: epoch ``e`` visits the training blocks in the permutation seeded by ``(seed, e)``;
  each rank takes every ``world_size``-th block of it (no DistributedSampler needed).
* Resume: the training loader implements ``state_dict``/``load_state_dict`` (Lightning stores
  it in the checkpoint). Its state is the number of batches the trainer has consumed (counted
  by the module, as an epoch may end in a short accumulation), so a resumed run continues with exactly the
  batch an uninterrupted run would have seen next.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, Dataset

from spear.data.packing import PackedCorpus, tokenize_and_pack
from spear.errors import SpearError

log = logging.getLogger(__name__)

class BlockDataset(Dataset):
    """Rows of a (num_blocks, block_size) token array, selected by ``indices``, as int64 tensors."""

    def __init__(self, blocks: np.ndarray, indices: np.ndarray) -> None:
        self.blocks = blocks
        self.indices = np.asarray(indices, dtype=np.int64)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        row = np.asarray(self.blocks[self.indices[i]], dtype=np.int64)
        return {"input_ids": torch.from_numpy(row)}


class ResumableBatchSampler:
    """Seeded per-epoch batches of dataset positions, sharded by rank, with a resume offset.

    Every ``iter()`` is one epoch. ``progress`` (a callable giving the number of batches the
    trainer has consumed so far) makes ``state_dict`` exact under Lightning's prefetching.
    """

    def __init__(
        self,
        num_items: int,
        batch_size: int,
        *,
        shuffle: bool = True,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        progress: Callable[[], int] | None = None,
    ) -> None:
        self.num_items, self.batch_size = int(num_items), int(batch_size)
        self.shuffle, self.seed = bool(shuffle), int(seed)
        self.rank, self.world_size = int(rank), int(world_size)
        self.per_rank = self.num_items // self.world_size
        self.num_batches = self.per_rank // self.batch_size
        self.progress = progress
        self._epoch = 0  # epoch of the next iter()
        self._offset = 0  # batches of that epoch to skip (resume)
        self._consumed = 0  # batches yielded (fallback when no progress callable)

    def __len__(self) -> int:
        return self.num_batches

    def epoch_batches(self, epoch: int) -> np.ndarray:
        """(num_batches, batch_size) dataset positions of this rank for ``epoch``."""
        if self.shuffle:
            order = np.random.default_rng([self.seed, epoch]).permutation(self.num_items)
        else:
            order = np.arange(self.num_items)
        mine = order[: self.per_rank * self.world_size][self.rank :: self.world_size]
        return mine[: self.num_batches * self.batch_size].reshape(self.num_batches, self.batch_size)

    def __iter__(self) -> Iterator[list[int]]:
        epoch, start = self._epoch, self._offset
        self._epoch, self._offset = epoch + 1, 0
        self._consumed = epoch * self.num_batches + start
        for batch in self.epoch_batches(epoch)[start:]:
            self._consumed += 1
            yield batch.tolist()

    def state_dict(self) -> dict[str, int]:
        consumed = int(self.progress()) if self.progress is not None else self._consumed
        return {"consumed_batches": consumed, "num_batches": self.num_batches, "seed": self.seed}

    def load_state_dict(self, state: dict[str, int]) -> None:
        if int(state.get("num_batches", self.num_batches)) != self.num_batches:
            log.warning(
                "resuming with %d batches per epoch, the checkpoint had %s: the data order will differ",
                self.num_batches,
                state.get("num_batches"),
            )
        if self.num_batches:
            self._epoch, self._offset = divmod(int(state["consumed_batches"]), self.num_batches)


class ResumableDataLoader(DataLoader):
    """A DataLoader whose position is saved in (and restored from) Lightning checkpoints."""

    def state_dict(self) -> dict[str, int]:
        return self.batch_sampler.state_dict()

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.batch_sampler.load_state_dict(state)


def split_blocks(num_blocks: int, val_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(train indices, validation indices): a seeded block-level split, each part sorted."""
    n_val = 0 if val_fraction <= 0 else max(1, int(round(num_blocks * val_fraction)))
    if n_val >= num_blocks:
        raise SpearError(
            f"the corpus gives {num_blocks} block(s): too few for a validation split of data.val_fraction={val_fraction}; "
            "add text, lower data.block_size, or set data.val_fraction=0"
        )
    perm = np.random.default_rng(seed).permutation(num_blocks)
    return np.sort(perm[n_val:]), np.sort(perm[:n_val])


class SpearDataModule(pl.LightningDataModule):
    """Packed-corpus data for CPT: ``{"input_ids": LongTensor[batch, block_size]}`` batches."""

    def __init__(self, data_cfg, tokenizer, seed: int) -> None:
        """``data_cfg``: the validated ``data`` config; ``seed`` orders the training blocks per epoch."""
        super().__init__()
        self.data = data_cfg
        self.tokenizer = tokenizer
        self.seed = int(seed)
        self.corpus: PackedCorpus | None = None
        self.train_indices: np.ndarray | None = None
        self.val_indices: np.ndarray | None = None

    # -- data preparation -------------------------------------------------------------------
    def load_corpus(self) -> PackedCorpus:
        d = self.data
        if self.corpus is None:
            self.corpus = tokenize_and_pack(
                list(d.paths),
                self.tokenizer,
                d.block_size,
                format=d.format,
                text_field=d.text_field,
                doc_separator=d.doc_separator,
                add_eos=d.add_eos,
                cache_dir=d.cache_dir if d.cache else None,
            )
            self.train_indices, self.val_indices = split_blocks(self.corpus.num_blocks, d.val_fraction, d.split_seed)
            if len(self.train_indices) < d.batch_size:
                raise SpearError(
                    f"{len(self.train_indices)} training block(s) cannot fill one batch of data.batch_size={d.batch_size}; "
                    "add text, lower data.block_size or data.batch_size"
                )
        return self.corpus

    def prepare_data(self) -> None:
        self.load_corpus()

    def setup(self, stage: str | None = None) -> None:
        self.load_corpus()

    # -- loaders ------------------------------------------------------------------------------
    def _rank_world(self) -> tuple[int, int]:
        trainer = getattr(self, "trainer", None)
        if trainer is None:
            return 0, 1
        return int(trainer.global_rank), int(trainer.world_size)

    def _progress(self) -> Callable[[], int] | None:
        trainer = getattr(self, "trainer", None)
        if trainer is None:
            return None
        # counted batches, not global_step * accumulation: an epoch whose length the accumulation does
        # not divide ends with a short optimizer step
        return lambda: int(getattr(trainer.lightning_module, "batches_seen", 0))

    def train_sampler(self) -> ResumableBatchSampler:
        self.load_corpus()
        rank, world = self._rank_world()
        sampler = ResumableBatchSampler(
            len(self.train_indices),
            self.data.batch_size,
            shuffle=self.data.shuffle,
            seed=self.seed,
            rank=rank,
            world_size=world,
            progress=self._progress(),
        )
        if len(sampler) == 0:
            raise SpearError(
                f"{len(self.train_indices)} training blocks over {world} device(s) cannot fill one batch of "
                f"data.batch_size={self.data.batch_size}; add text or lower data.batch_size / data.block_size"
            )
        return sampler

    def train_dataloader(self) -> ResumableDataLoader:
        corpus = self.load_corpus()
        return ResumableDataLoader(
            BlockDataset(corpus.blocks, self.train_indices),
            batch_sampler=self.train_sampler(),
            num_workers=self.data.num_workers,
        )

    def val_dataloader(self) -> DataLoader | list:
        corpus = self.load_corpus()
        if len(self.val_indices) == 0:
            return []
        rank, world = self._rank_world()
        indices = self.val_indices[rank::world] if world > 1 else self.val_indices
        return DataLoader(
            BlockDataset(corpus.blocks, indices),
            batch_size=self.data.eval_batch_size or self.data.batch_size,
            shuffle=False,
            num_workers=self.data.num_workers,
        )

    @property
    def tokens_per_batch(self) -> int:
        return self.data.batch_size * self.data.block_size

    def describe(self) -> dict[str, Any]:
        corpus = self.load_corpus()
        return {
            "sources": corpus.sources,
            "num_documents": corpus.num_documents,
            "num_tokens": corpus.num_tokens,
            "block_size": corpus.block_size,
            "train_blocks": int(len(self.train_indices)),
            "val_blocks": int(len(self.val_indices)),
            "cache": str(corpus.cache_path) if corpus.cache_path else None,
            "key": corpus.key,
        }
