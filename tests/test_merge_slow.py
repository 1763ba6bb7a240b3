"""Merge on the embedded SmolLM2-135M (slow: real model; skipped when assets are not prepared)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def smol_pair(tmp_path_factory):
    from spear.errors import SpearError
    from spear.models import resolve_model_dir

    try:
        base = resolve_model_dir("smollm2_135m")
    except SpearError as err:
        pytest.skip(str(err))
    from test_merge import perturb

    adapted = perturb(base, tmp_path_factory.mktemp("smol") / "adapted", scale=0.02, seed=0)
    return base, adapted


def test_smollm2_merge_loads_matches_in_memory_and_restores(smol_pair, tmp_path, compose):
    from test_merge import write_ranking_n
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from spear.config.schema import SlerpMerge
    from spear.merging.inmemory import InMemoryMerger
    from spear.merging.plan import TMap
    from spear.merging.stage import run_merge as run

    base, adapted = smol_pair
    ranking = write_ranking_n(tmp_path / "ranking.json", 30)
    result = run(compose("merge", [f"base={base}", f"adapted={adapted}", f"ranking={ranking}", "progress=false",
                                   "merge.max_shard_size=200MB"]))  # fmt: skip
    out = Path(result["model_dir"])
    report = json.loads(Path(result["report_path"]).read_text())
    assert len(report["tensors"]) == 272 and report["fallbacks"] == 0
    assert (out / "model.safetensors.index.json").exists()
    merged = AutoModelForCausalLM.from_pretrained(out).eval()
    tok = AutoTokenizer.from_pretrained(out)
    ids = tok("Debits and credits must balance in double-entry accounting.", return_tensors="pt").input_ids
    with torch.no_grad():
        assert torch.isfinite(merged(input_ids=ids, labels=ids).loss)
    assert merged.lm_head.weight.data_ptr() == merged.model.embed_tokens.weight.data_ptr()

    model = AutoModelForCausalLM.from_pretrained(adapted).eval()
    merger = InMemoryMerger(model, base, SlerpMerge())
    tmap = TMap.of_layers({int(k): v for k, v in report["layer_t"].items()}, report["non_layer_t"])
    merger.apply(tmap)
    streamed = dict(merged.named_parameters())
    for name, param in model.named_parameters():
        assert torch.equal(param, streamed[name]), name
