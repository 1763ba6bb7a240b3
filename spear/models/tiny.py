"""Tiny random-weight models built from a config, for fast offline tests.

No download: the tokenizer is a byte-level one built in code (256 bytes + 3 specials), and
the weights come from a seeded random init. ``TINY_SPECS`` is a data table, one entry per alias.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

SPECIALS = ("<pad>", "<s>", "</s>")
BYTE_VOCAB = 256 + len(SPECIALS)

TINY_SPECS: dict[str, dict[str, Any]] = {
    "tiny_llama": {
        "model_type": "llama",
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 4,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 512,
        "tie_word_embeddings": True,
    },
    "tiny_gemma": {
        "model_type": "gemma3_text",
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 4,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": 16,
        "max_position_embeddings": 512,
        "sliding_window": 64,
        "tie_word_embeddings": True,
    },
}


def byte_tokenizer():
    """A byte-level BPE tokenizer with no merges: every text round-trips, nothing to download."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {tok: i for i, tok in enumerate(SPECIALS)}
    for ch in sorted(alphabet):
        vocab[ch] = len(vocab)
    core = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(
        tokenizer_object=core, pad_token="<pad>", bos_token="<s>", eos_token="</s>", unk_token=None
    )


def tiny_config(alias: str):
    from transformers import AutoConfig

    spec = dict(TINY_SPECS[alias])
    model_type = spec.pop("model_type")
    return AutoConfig.for_model(
        model_type, vocab_size=BYTE_VOCAB, pad_token_id=0, bos_token_id=1, eos_token_id=2, **spec
    )


def build_tiny(alias: str, seed: int = 0):
    """(model, tokenizer) of a tiny alias with seeded random weights, in float32."""
    import torch
    from transformers import AutoModelForCausalLM

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(tiny_config(alias), dtype=torch.float32)
    return model.eval(), byte_tokenizer()


def save_tiny(alias: str, out_dir: Path, seed: int = 0) -> Path:
    """Write a tiny alias as an HF safetensors dir (model + tokenizer)."""
    model, tok = build_tiny(alias, seed)
    model.save_pretrained(out_dir)
    tok.save_pretrained(out_dir)
    return out_dir
