"""Tokenise a corpus once, pack it into fixed-length blocks, cache the token stream on disk.

The token stream is every document's tokens followed by an EOS separator, concatenated. It
is stored as one 1-D ``.npy`` array (uint16 when the vocabulary fits, else uint32) under the
cache, ``<cache_dir>/<key>.npy`` with a ``<key>.json`` sidecar, where the key hashes the
tokenizer, the corpus content and the reading options; a second run memory-maps it instead of
re-tokenising. Blocks are views of that array: ``tokens[: n * block_size].reshape(n, block_size)``
(the incomplete tail is dropped), so one cached stream serves every block size.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from spear.data.corpora import corpus_fingerprint, iter_documents, resolve_corpus
from spear.errors import SpearError
from spear.io.atomic import write_json_atomic

log = logging.getLogger(__name__)

# Bump when the token stream layout changes: old cache entries are then ignored.
FORMAT_VERSION = 1
_TOKENIZE_BATCH = 64


@dataclass
class PackedCorpus:
    """A tokenised corpus: the 1-D token stream and its fixed-length blocks."""

    tokens: np.ndarray  # 1-D stream (memory-mapped when cached)
    block_size: int
    key: str
    num_documents: int
    cache_path: Path | None = None
    sources: list[str] = field(default_factory=list)

    @property
    def num_tokens(self) -> int:
        return int(self.tokens.shape[0])

    @property
    def num_blocks(self) -> int:
        return self.num_tokens // self.block_size

    @property
    def blocks(self) -> np.ndarray:
        """(num_blocks, block_size) view of the stream; the incomplete tail is dropped."""
        n = self.num_blocks
        return self.tokens[: n * self.block_size].reshape(n, self.block_size)


def tokenizer_fingerprint(tokenizer) -> str:
    """sha256 identifying a tokenizer's behaviour (its serialized fast tokenizer, else its vocab)."""
    digest = hashlib.sha256()
    digest.update(type(tokenizer).__name__.encode())
    digest.update(f"\0eos={tokenizer.eos_token_id}\0n={len(tokenizer)}\0".encode())
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        digest.update(backend.to_str().encode())
    else:
        digest.update(json.dumps(sorted(tokenizer.get_vocab().items())).encode())
    return digest.hexdigest()


def _token_dtype(tokenizer) -> np.dtype:
    return np.dtype(np.uint16) if len(tokenizer) <= np.iinfo(np.uint16).max + 1 else np.dtype(np.uint32)


def tokenize_documents(documents: Iterable[str], tokenizer, *, add_eos: bool = True) -> tuple[np.ndarray, int]:
    """(1-D token stream, number of documents): each document's tokens, then EOS."""
    eos = tokenizer.eos_token_id
    if add_eos and eos is None:
        raise SpearError("the tokenizer has no EOS token to separate documents; set data.add_eos=false or use another tokenizer")
    dtype = _token_dtype(tokenizer)
    chunks: list[np.ndarray] = []
    num_docs = 0
    batch: list[str] = []

    def flush() -> None:
        if not batch:
            return
        encoded = tokenizer(batch, add_special_tokens=False, verbose=False)["input_ids"]
        for ids in encoded:
            chunks.append(np.asarray([*ids, eos] if add_eos else ids, dtype=dtype))
        batch.clear()

    for doc in documents:
        batch.append(doc)
        num_docs += 1
        if len(batch) >= _TOKENIZE_BATCH:
            flush()
    flush()
    stream = np.concatenate(chunks) if chunks else np.zeros(0, dtype=dtype)
    return stream, num_docs


def _save_npy_atomic(path: Path, array: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".tmp-{path.name}-", suffix=".npy", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            np.save(fh, array)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _cache_key(tok_fp: str, corpus_fp: str, add_eos: bool) -> str:
    payload = json.dumps({"v": FORMAT_VERSION, "tok": tok_fp, "corpus": corpus_fp, "eos": add_eos}, sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()[:32]


def tokenize_and_pack(
    paths: str | Sequence[str] | None,
    tokenizer,
    block_size: int,
    *,
    texts: Sequence[str] | None = None,
    format: str = "auto",
    text_field: str = "text",
    doc_separator: str | None = None,
    add_eos: bool = True,
    cache_dir: str | Path | None = None,
    min_blocks: int = 1,
) -> PackedCorpus:
    """Tokenise a corpus (files/globs/dirs/``asset:<name>`` in ``paths``, or in-memory ``texts``),
    pack it into ``block_size`` blocks, and cache the stream under ``cache_dir`` (when given).

    Raises :class:`SpearError` when the corpus is missing, unreadable, empty, or shorter than
    ``min_blocks`` blocks.
    """
    if block_size < 2:
        raise SpearError(f"data.block_size={block_size} is too small; use at least 2 tokens (typically 256-4096)")
    if texts is not None:
        files, sources = [], ["<texts>"]
        corpus_fp = hashlib.sha256("\0".join(["texts", doc_separator or "", *texts]).encode()).hexdigest()
    else:
        files = resolve_corpus(paths, format)
        sources = [str(cf.path) for cf in files]
        corpus_fp = corpus_fingerprint(files, text_field=text_field, doc_separator=doc_separator)
    key = _cache_key(tokenizer_fingerprint(tokenizer), corpus_fp, add_eos)
    cache_path = Path(cache_dir).expanduser() / f"{key}.npy" if cache_dir else None

    tokens = None
    num_docs = 0
    if cache_path is not None and cache_path.exists():
        try:
            tokens = np.load(cache_path, mmap_mode="r")
            meta = json.loads(cache_path.with_suffix(".json").read_text())
            num_docs = int(meta.get("num_documents", 0))
            log.info("token cache hit: %s (%d tokens)", cache_path, tokens.shape[0])
        except (OSError, ValueError) as err:
            log.warning("token cache %s unreadable (%s); re-tokenising", cache_path, err)
            tokens = None
    if tokens is None:
        if texts is not None:
            docs = (t for t in texts if t.strip())
        else:
            docs = iter_documents(files, text_field=text_field, doc_separator=doc_separator)
        stream, num_docs = tokenize_documents(docs, tokenizer, add_eos=add_eos)
        if num_docs == 0:
            raise SpearError(f"the corpus {', '.join(sources) or '<empty>'} holds no text; fix data.paths (or data.text_field for JSONL)")
        log.info("tokenised %d documents into %d tokens", num_docs, stream.shape[0])
        if cache_path is not None:
            _save_npy_atomic(cache_path, stream)
            write_json_atomic(
                cache_path.with_suffix(".json"),
                {"format_version": FORMAT_VERSION, "num_documents": num_docs, "num_tokens": int(stream.shape[0]),
                 "dtype": str(stream.dtype), "sources": sources, "add_eos": add_eos},
            )
            tokens = np.load(cache_path, mmap_mode="r")
        else:
            tokens = stream
    packed = PackedCorpus(tokens, int(block_size), key, num_docs, cache_path, sources)
    if packed.num_blocks < min_blocks:
        raise SpearError(
            f"the corpus has {packed.num_tokens} tokens, fewer than {min_blocks} block(s) of data.block_size={block_size}; "
            "add text to data.paths or lower data.block_size"
        )
    return packed
