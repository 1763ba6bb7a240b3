"""Corpora, tokenise + pack (cached token streams), and the LightningDataModule for CPT.

``tokenize_and_pack`` and ``resolve_corpus`` need only numpy; ``SpearDataModule`` (torch,
Lightning) is imported on first use.
"""

from spear.data.corpora import CorpusFile, iter_documents, resolve_corpus
from spear.data.packing import PackedCorpus, tokenize_and_pack, tokenizer_fingerprint

__all__ = [
    "CorpusFile",
    "PackedCorpus",
    "SpearDataModule",
    "iter_documents",
    "resolve_corpus",
    "tokenize_and_pack",
    "tokenizer_fingerprint",
]


def __getattr__(name: str):
    if name == "SpearDataModule":
        from spear.data.datamodule import SpearDataModule

        return SpearDataModule
    raise AttributeError(name)
