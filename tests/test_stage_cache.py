"""A stage cache that checks what it reuses (issue 23, part 2): every file of an entry is hashed when it is
written and verified when it is reused; a damaged entry is one warning and a fresh entry, never used and never
the reason a run stops; ``pipeline.force`` recomputes on purpose."""

from __future__ import annotations

import json
import logging
import random
from pathlib import Path

import pytest

from spear.io.artifacts import DONE, StageCache

TINY = [
    "model=tiny_llama",
    "data=text",
    "data.block_size=64",
    "trainer.max_steps=4",
    "trainer.val_check_interval=2",
    "eval=perplexity",
    "proxy.general.max_tokens=256",
    "proxy.domain.max_tokens=256",
    "pipeline.frontier.ts=[0.0,1.0]",
    "pipeline.controls=false",
]


def _compute(cache: StageCache, stage: str = "analyze", key: str = "k", payload: str = "ranking") -> tuple[dict, bool]:
    """One claim of ``key``: (its result, whether it was computed here); the stage writes two files."""
    with cache.claim(stage, key) as entry:
        computed = entry.result is None
        if computed:
            (entry.dir / "run").mkdir(parents=True, exist_ok=True)
            (entry.dir / "run" / "ranking.json").write_text(json.dumps({"order": [3, 1, 0, 2], "of": payload}))
            (entry.dir / "run" / "metrics.csv").write_text("layer,score\n0,0.5\n")
            entry.complete({"ranking": str(entry.dir / "run" / "ranking.json"), "seconds": 1.5})
    return entry.result, computed


def _warnings(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]


def test_an_intact_entry_is_reused_and_its_record_hashes_every_file(tmp_path, caplog):
    cache = StageCache(tmp_path)
    first, computed = _compute(cache)
    assert computed
    record = json.loads((tmp_path / "analyze" / "k" / DONE).read_text())
    assert set(record["files"]) == {"run/ranking.json", "run/metrics.csv"}
    assert all(len(f["sha256"]) == 64 and f["size"] > 0 for f in record["files"].values())
    again = StageCache(tmp_path)
    result, computed = _compute(again, payload="never written")
    assert not computed and result == first and again.events == [{"stage": "analyze", "key": "k", "hit": True}]
    assert not _warnings(caplog)


@pytest.mark.parametrize(("damage", "problem"), [
    (lambda entry: (entry / DONE).write_bytes((entry / DONE).read_bytes()[:40]), f"its {DONE} is unreadable"),
    (lambda entry: (entry / "run" / "metrics.csv").unlink(), "run/metrics.csv is missing"),
    (lambda entry: (entry / "run" / "ranking.json").write_text(
        (entry / "run" / "ranking.json").read_text().replace("3", "2")), "run/ranking.json changed since it was written"),
    (lambda entry: (entry / DONE).write_text((entry / DONE).read_text().replace('"seconds": 1.5', '"seconds": 9.5')),
     "the result in its done.json does not match its sha256"),
    (lambda entry: (entry / DONE).write_text(json.dumps({"ranking": "r.json", "seconds": 1.0})),
     f"its {DONE} is not a record with file hashes"),
    (lambda entry: (entry / DONE).write_text("[1, 2]"), f"its {DONE} is not a record with file hashes"),
])
def test_a_damaged_entry_is_one_warning_and_a_fresh_entry(tmp_path, caplog, damage, problem):
    """A truncated record, a missing file, a changed file, an edited result, an old record: each is one warning
    naming the stage and what is wrong, and the stage runs again into <key>-2; the damaged entry is left as it is."""
    cache = StageCache(tmp_path)
    _compute(cache)
    entry = tmp_path / "analyze" / "k"
    damage(entry)
    before = {p: p.read_bytes() for p in entry.rglob("*") if p.is_file()}
    recomputing = StageCache(tmp_path)
    result, computed = _compute(recomputing)
    assert computed and result["ranking"] == str(tmp_path / "analyze" / "k-2" / "run" / "ranking.json")
    warnings = _warnings(caplog)
    assert len(warnings) == 1 and "\n" not in warnings[0], warnings
    assert warnings[0].startswith("stage cache: the analyze entry") and problem in warnings[0] and "k-2" in warnings[0]
    assert recomputing.events[0]["recomputed"].startswith(problem)
    assert {p: p.read_bytes() for p in entry.rglob("*") if p.is_file()} == before
    # the fresh entry is the one reused from now on, and the damaged one is never looked at again
    caplog.clear()
    reused, computed = _compute(StageCache(tmp_path))
    assert not computed and reused == result and not _warnings(caplog)


def test_an_entry_whose_dir_is_a_file_is_recomputed(tmp_path, caplog):
    (tmp_path / "analyze").mkdir()
    (tmp_path / "analyze" / "k").write_text("not a dir")
    result, computed = _compute(StageCache(tmp_path))
    assert computed and "/k-2/" in result["ranking"] and len(_warnings(caplog)) == 1


def test_an_interrupted_entry_is_redone_where_it_was(tmp_path, caplog):
    (tmp_path / "analyze" / "k" / "run").mkdir(parents=True)  # killed before its record was written
    result, computed = _compute(StageCache(tmp_path))
    assert computed and "/k/" in result["ranking"] and not _warnings(caplog)


def test_force_recomputes_the_named_stages_once_per_command(tmp_path):
    import time

    _compute(StageCache(tmp_path), "train")
    _compute(StageCache(tmp_path), "analyze")
    time.sleep(0.05)  # file times tick coarsely: the command starts after those entries were written
    forced = StageCache(tmp_path, force=frozenset({"train"}), since=time.time())
    time.sleep(0.05)
    assert _compute(forced, "train")[1] and not _compute(forced, "analyze")[1]
    assert not _compute(forced, "train")[1]  # what this command recomputed is reused (a sweep's later jobs)
    assert sorted(p.name for p in (tmp_path / "train").iterdir() if not p.name.startswith(".")) == ["k", "k-2"]
    assert forced.events[0]["recomputed"] == "pipeline.force"


# ------------------------------------------------------------------------------------------- the pipeline


@pytest.fixture(scope="module")
def runs(corpus, tmp_path_factory):
    """One cache, three runs: clean; with pipeline.force=[train]; after the newest CPT's weights were
    overwritten with garbage of the same size. Each run's summary and warnings."""
    from spear.config import compose
    from spear.pipeline import run_pipeline

    root = tmp_path_factory.mktemp("stage_cache")
    cache = root / "cache"
    handler = _Collect()
    logging.getLogger("spear").addHandler(handler)
    out: dict[str, dict] = {}
    try:
        for name, extra in [("clean", []), ("forced", ["pipeline.force=[train]"]), ("garbage", [])]:
            if name == "garbage":
                weights = sorted(cache.glob("train/*/run/model/model.safetensors"))[-1]
                out["damaged_file"] = {"path": weights, "sha256": _sha(weights)}
                weights.write_bytes(random.Random(1).randbytes(weights.stat().st_size))
                out["damaged_file"]["garbage"] = weights.read_bytes()
            handler.messages.clear()
            summary = run_pipeline(compose("pipeline", [*TINY, f"data.paths=[{corpus}]", f"pipeline.cache_dir={cache}",
                                                        f"paths.output_dir={root / name}", "logger=none", "progress=false",
                                                        *extra]))
            out[name] = {"summary": summary, "warnings": list(handler.messages)}
    finally:
        logging.getLogger("spear").removeHandler(handler)
    out["cache"] = cache
    return out


class _Collect(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


def _sha(path: Path) -> str:
    from spear.io.hashing import file_sha256

    return file_sha256(path)


def _hits(summary: dict) -> dict[str, list[bool]]:
    hits: dict[str, list[bool]] = {}
    for event in summary["cache"]:
        hits.setdefault(event["stage"], []).append(event["hit"])
    return hits


def test_force_recomputes_only_the_named_stage(runs):
    clean, forced = runs["clean"]["summary"], runs["forced"]["summary"]
    assert not any(e["hit"] for e in clean["cache"])
    train = [e for e in forced["cache"] if e["stage"] == "train"]
    assert train == [{"stage": "train", "key": train[0]["key"], "hit": False, "recomputed": "pipeline.force"}]
    assert all(e["hit"] for e in forced["cache"] if e["stage"] != "train"), forced["cache"]
    assert forced["models"] == clean["models"] and not runs["forced"]["warnings"]
    assert sorted(p.name for p in (runs["cache"] / "train").iterdir() if not p.name.startswith(".")) == [
        train[0]["key"], f"{train[0]['key']}-2", f"{train[0]['key']}-3"]


def test_garbage_weights_are_one_warning_and_a_recomputed_cpt_with_the_clean_result(runs):
    """The reproduction: a cached CPT whose weights were overwritten was reused (general NLL 411). Now the damage
    is one warning naming the stage and the file, the CPT runs again into a fresh entry, and every number equals
    the clean run's; the damaged file is left as it was."""
    garbage = runs["garbage"]
    warnings = garbage["warnings"]
    assert len(warnings) == 1 and "the train entry" in warnings[0] and "model.safetensors changed" in warnings[0], warnings
    assert _hits(garbage["summary"]) == {"evaluate": [True, True, True], "train": [False], "analyze": [True]}
    assert garbage["summary"]["models"] == runs["clean"]["summary"]["models"]
    damaged = runs["damaged_file"]
    assert damaged["path"].read_bytes() == damaged["garbage"]
    fresh = Path(garbage["summary"]["artifacts"]["1234"]["adapted_model"]) / "model.safetensors"
    assert fresh != damaged["path"] and _sha(fresh) == damaged["sha256"]
