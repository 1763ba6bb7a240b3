"""Corpora, tokenise + pack (cached), the train/validation split and the resumable data order."""

from __future__ import annotations

import json

import numpy as np
import pytest

from spear.config.schema import DataConfig
from spear.data import packing as packing_mod
from spear.data import resolve_corpus, tokenize_and_pack
from spear.data.datamodule import ResumableBatchSampler, SpearDataModule, split_blocks
from spear.errors import SpearError
from spear.models.tiny import byte_tokenizer


@pytest.fixture(scope="module")
def tok():
    return byte_tokenizer()


def _write(path, text):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


def test_pack_text_files_with_eos_separators(tmp_path, tok):
    a = _write(tmp_path / "a.txt", "hello world")
    b = _write(tmp_path / "b.txt", "second doc")
    packed = tokenize_and_pack([str(a), str(b)], tok, block_size=4)
    stream = np.asarray(packed.tokens)
    eos = tok.eos_token_id
    assert packed.num_documents == 2
    assert stream.dtype == np.uint16
    assert stream.tolist().count(eos) == 2 and stream[-1] == eos
    first = stream[: stream.tolist().index(eos)].tolist()
    assert tok.decode(first) == "hello world"
    assert packed.blocks.shape == (len(stream) // 4, 4)
    assert np.array_equal(packed.blocks.reshape(-1), stream[: packed.num_blocks * 4])


def test_cache_hit_skips_tokenising_and_keys_on_tokenizer_and_content(tmp_path, tok, monkeypatch):
    corpus = _write(tmp_path / "c.txt", "some text " * 50)
    cache = tmp_path / "tokens"
    first = tokenize_and_pack([str(corpus)], tok, 16, cache_dir=cache)
    assert first.cache_path.exists() and first.cache_path.parent == cache

    def boom(*a, **k):
        raise AssertionError("re-tokenised despite the cache")

    monkeypatch.setattr(packing_mod, "tokenize_documents", boom)
    again = tokenize_and_pack([str(corpus)], tok, 32, cache_dir=cache)  # block size is not part of the key
    assert again.key == first.key and isinstance(again.tokens, np.memmap)
    assert np.array_equal(np.asarray(again.tokens), np.asarray(first.tokens))
    monkeypatch.undo()

    corpus.write_text("other text " * 50)
    changed = tokenize_and_pack([str(corpus)], tok, 16, cache_dir=cache)
    assert changed.key != first.key
    other_tok = byte_tokenizer()
    other_tok.add_special_tokens({"additional_special_tokens": ["<x>"]})
    assert tokenize_and_pack([str(corpus)], other_tok, 16, cache_dir=cache).key != changed.key


def test_jsonl_globs_dirs_and_doc_separator(tmp_path, tok):
    lines = [{"text": "alpha"}, {"text": "  "}, {"text": "beta", "meta": 1}]
    _write(tmp_path / "d" / "x.jsonl", "\n".join(json.dumps(r) for r in lines) + "\n\n")
    _write(tmp_path / "d" / "sub" / "y.txt", "one\n===\ntwo")
    files = resolve_corpus([str(tmp_path / "d")])
    assert [f.format for f in files] == ["text", "jsonl"]  # sorted: sub/y.txt < x.jsonl
    packed = tokenize_and_pack([str(tmp_path / "d")], tok, 2, doc_separator=r"\n===\n")
    assert packed.num_documents == 4  # alpha, beta, one, two (blank JSONL text skipped)
    glob_packed = tokenize_and_pack([str(tmp_path / "d" / "**" / "*.txt")], tok, 2)
    assert glob_packed.num_documents == 1
    custom = _write(tmp_path / "c.jsonl", json.dumps({"body": "gamma"}) + "\n")
    assert tokenize_and_pack([str(custom)], tok, 2, text_field="body").num_documents == 1


@pytest.mark.parametrize(
    "setup, match",
    [
        (lambda p: _write(p / "e.txt", ""), "holds no text"),
        (lambda p: _write(p / "e.txt", " \n\n \t"), "holds no text"),
        (lambda p: (p / "e.txt").write_bytes(b"\xff\xfe\x00bad"), "not UTF-8"),
        (lambda p: _write(p / "e.jsonl", '{"text": "a"}\n{oops\n'), r"e.jsonl:2 is not valid JSON"),
        (lambda p: _write(p / "e.jsonl", '{"content": "a"}\n'), "data.text_field"),
        (lambda p: _write(p / "e.txt", "ab"), "fewer than 1 block"),
    ],
)
def test_bad_corpora_are_one_line_errors(tmp_path, tok, setup, match):
    setup(tmp_path)
    path = next(tmp_path.iterdir())
    with pytest.raises(SpearError, match=match) as err:
        tokenize_and_pack([str(path)], tok, 8)
    assert "\n" not in str(err.value)


def test_missing_corpus_entries(tmp_path, tok):
    with pytest.raises(SpearError, match="does not exist"):
        tokenize_and_pack([str(tmp_path / "nope.txt")], tok, 8)
    with pytest.raises(SpearError, match="matched no files"):
        tokenize_and_pack([str(tmp_path / "*.txt")], tok, 8)
    with pytest.raises(SpearError, match="data.paths is empty"):
        tokenize_and_pack([], tok, 8)


def test_embedded_asset_entry(tmp_path, tok, monkeypatch):
    monkeypatch.setenv("SPEAR_HOME", str(tmp_path / "home"))
    with pytest.raises(SpearError, match="not prepared"):
        tokenize_and_pack(["asset:finance_train"], tok, 8)
    _write(tmp_path / "home" / "corpora" / "finance_news" / "train.txt", "debit and credit " * 20)
    assert tokenize_and_pack(["asset:finance_train"], tok, 8).num_documents == 1


def test_split_is_deterministic_and_disjoint():
    tr, va = split_blocks(100, 0.1, seed=3)
    tr2, va2 = split_blocks(100, 0.1, seed=3)
    assert np.array_equal(tr, tr2) and np.array_equal(va, va2)
    assert len(va) == 10 and not set(tr) & set(va) and len(tr) + len(va) == 100
    assert not np.array_equal(va, split_blocks(100, 0.1, seed=4)[1])
    assert len(split_blocks(10, 0.0, 0)[1]) == 0
    with pytest.raises(SpearError, match="val_fraction"):
        split_blocks(1, 0.5, 0)


def test_sampler_resume_continues_the_same_order():
    full = ResumableBatchSampler(10, 3, shuffle=True, seed=7)
    stream = [b for _ in range(3) for b in full]  # 3 epochs of 3 batches
    assert len(stream) == 9 and stream[:3] != stream[3:6]  # reshuffled per epoch
    for consumed in (0, 2, 3, 5):
        resumed = ResumableBatchSampler(10, 3, shuffle=True, seed=7)
        resumed.load_state_dict({"consumed_batches": consumed, "num_batches": 3})
        rest = [b for _ in range(3) for b in resumed][: 9 - consumed]
        assert rest == stream[consumed:]
    # state_dict follows the trainer's progress when given (exact under prefetching)
    s = ResumableBatchSampler(10, 3, seed=7, progress=lambda: 4)
    assert s.state_dict()["consumed_batches"] == 4


def test_sampler_shards_ranks_disjointly():
    shards = [ResumableBatchSampler(20, 2, seed=1, rank=r, world_size=2).epoch_batches(0) for r in range(2)]
    a, b = (set(s.reshape(-1).tolist()) for s in shards)
    assert not a & b and len(a) == len(b) == 10


def test_datamodule_batches(tmp_path, tok):
    corpus = _write(tmp_path / "c.txt", "x" * 400)
    cfg = DataConfig(paths=[str(corpus)], block_size=16, batch_size=4, val_fraction=0.1, cache=False)
    dm = SpearDataModule(cfg, tok, seed=0)
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    assert batch["input_ids"].shape == (4, 16) and str(batch["input_ids"].dtype) == "torch.int64"
    info = dm.describe()
    assert info["train_blocks"] + info["val_blocks"] == 401 // 16
    assert len(dm.train_dataloader()) == info["train_blocks"] // 4
    with pytest.raises(SpearError, match="batch_size"):
        SpearDataModule(cfg.replace(batch_size=1000), tok, seed=0).setup("fit")
