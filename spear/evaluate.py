"""``python -m spear.evaluate``: lm-eval tasks + perplexity of one model, and retention.

Writes into the run dir: ``results.json`` (SPEC §2.6), ``results.md`` (the tables, also printed)
and, when ``references.base`` is given, ``retention.json``. A reference is a ``results.json``
(or a run dir holding one) from the same eval suite, or a model ref that is evaluated now with
the same suite (its results are saved as ``references/<role>_results.json``).
W&B (``logger=wandb``, offline by default) gets lm-eval's own WandbLogger report plus the
perplexity and retention numbers.
"""

from __future__ import annotations

import gc
import json
import logging
import time
from pathlib import Path
from typing import Any

from spear.cli import hydra_entry
from spear.errors import SpearError

log = logging.getLogger(__name__)


def resolve_device(name: str | None) -> str:
    import torch

    name = str(name or "auto")
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise SpearError(f"device={name!r} but CUDA is not available; use device=cpu or device=auto")
    return name


def _load(model_cfg, ref: str, device: str):
    from spear.models import load_model

    model, tokenizer = load_model(
        ref,
        dtype=model_cfg.get("dtype", "float32"),
        allow_pickle=model_cfg.get("allow_pickle", False),
        trust_remote_code=model_cfg.get("trust_remote_code", False),
        allow_network=model_cfg.get("allow_network", False),
    )
    return (model.to(device) if device != "cpu" else model), tokenizer


def _load_and_evaluate(model_cfg, ref: str, eval_cfg, device: str, name: str) -> dict[str, Any]:
    from spear.evaluation.harness import evaluate_model

    model, tokenizer = _load(model_cfg, ref, device)
    try:
        return evaluate_model(model, tokenizer, eval_cfg, name)
    finally:
        del model
        gc.collect()


def load_results_file(path: Path, role: str) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise SpearError(f"references.{role}={path}: not a readable results.json ({err})") from None
    if not isinstance(data, dict) or "tasks" not in data or "perplexity" not in data:
        raise SpearError(f"references.{role}={path} is not a spear results.json (no tasks/perplexity keys)")
    data.setdefault("nll", {})
    return data


def precheck_reference(ref: Any, role: str, eval_cfg) -> None:
    """A results.json reference must cover the suite's tasks and corpora (checked before evaluating)."""
    from spear.evaluation.harness import corpus_specs

    if ref is None:
        return
    path = Path(str(ref)).expanduser()
    path = path / "results.json" if path.is_dir() and (path / "results.json").is_file() else path
    if not (path.is_file() and path.suffix == ".json"):
        return  # a model ref: evaluated later with this very suite
    data = load_results_file(path, role)
    missing = [str(t) for t in (eval_cfg.get("tasks") or []) if str(t) not in data["tasks"]]
    missing += [f"perplexity:{c}" for c in corpus_specs(eval_cfg) if c not in data["nll"]]
    if missing:
        raise SpearError(
            f"references.{role} ({path}) lacks {', '.join(missing)}: it comes from another task set; evaluate the "
            f"{role} model with eval={eval_cfg.get('name')}, or point references.{role} to a model ref so that it is evaluated now"
        )


def resolve_reference(ref: Any, role: str, cfg, device: str, out_dir: Path, done: dict[str, dict]) -> dict[str, Any] | None:
    """A reference's results: read from a results.json / run dir, or evaluated now from a model ref."""
    if ref is None or str(ref) in ("", "null", "None"):
        return None
    ref = str(ref)
    if ref in done:
        return done[ref]
    path = Path(ref).expanduser()
    if path.is_file() and path.suffix == ".json":
        results = load_results_file(path, role)
    elif path.is_dir() and (path / "results.json").is_file():
        results = load_results_file(path / "results.json", role)
    else:
        log.info("evaluating references.%s = %s with eval=%s", role, ref, cfg.eval.get("name"))
        results = _load_and_evaluate(cfg.model, ref, cfg.eval, device, name=ref)
        from spear.io.atomic import write_json_atomic

        write_json_atomic(out_dir / "references" / f"{role}_results.json", results)
    done[ref] = results
    return results


def _flat_metrics(results: dict[str, Any], retention: dict[str, Any] | None) -> dict[str, float]:
    flat: dict[str, float] = {}
    for corpus, value in results.get("perplexity", {}).items():
        if value is not None:
            flat[f"perplexity/{corpus}"] = value
    for corpus, value in results.get("nll", {}).items():
        flat[f"nll/{corpus}"] = value
    if retention:
        for name, value in retention["retention"].items():
            if value is not None:
                flat[f"retention/{name}"] = value
        for key in ("general_retention", "domain_gain_preservation"):
            if retention.get(key) is not None:
                flat[key] = retention[key]
    return flat


def run(cfg) -> dict[str, Any]:
    """Evaluate ``cfg.model`` on ``cfg.eval``; retention when ``cfg.references.base`` is set."""
    from spear.evaluation.harness import check_suite, evaluate_model
    from spear.evaluation.retention import retention_from_suite
    from spear.evaluation.tables import print_markdown, results_markdown, retention_markdown
    from spear.io.atomic import write_json_atomic, write_text_atomic
    from spear.tracking import start_tracker

    start = time.perf_counter()
    out_dir = Path(cfg.paths.output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    check_suite(cfg.eval)
    refs = cfg.get("references") or {}
    if refs.get("adapted") is not None and refs.get("base") is None:
        raise SpearError("references.adapted is set but references.base is not: retention needs the base model")
    for role in ("base", "adapted"):
        precheck_reference(refs.get(role), role, cfg.eval)
    device = resolve_device(cfg.get("device", "auto"))
    name = str(cfg.get("name") or cfg.model.ref)

    model, tokenizer = _load(cfg.model, str(cfg.model.ref), device)  # bad refs fail before any output
    tracker = start_tracker(cfg, "evaluate")
    logger_kind = (cfg.get("logger") or {}).get("name", "none")

    def _to_wandb(raw: dict[str, Any]) -> None:
        from lm_eval.loggers import WandbLogger

        try:
            wandb_logger = WandbLogger()  # attaches to the run start_tracker opened
            wandb_logger.post_init(raw)
            wandb_logger.log_eval_result()
        except Exception as err:  # logging must never lose an evaluation
            log.warning("lm-eval's WandbLogger failed (%s); results.json is unaffected", err)

    try:
        results = evaluate_model(
            model, tokenizer, cfg.eval, name, lm_eval_callback=_to_wandb if logger_kind == "wandb" else None
        )
        del model
        gc.collect()
        results["seconds"]["total"] = round(time.perf_counter() - start, 3)
        write_json_atomic(out_dir / "results.json", results)

        retention = None
        done = {str(cfg.model.ref): results}
        base = resolve_reference(refs.get("base"), "base", cfg, device, out_dir, done)
        adapted = resolve_reference(refs.get("adapted"), "adapted", cfg, device, out_dir, done)
        if base is not None:
            retention = retention_from_suite(results, base, adapted, cfg.eval)
            write_json_atomic(out_dir / "retention.json", retention)

        markdown = results_markdown(results) + ("\n" + retention_markdown(retention) if retention else "")
        write_text_atomic(out_dir / "results.md", markdown)
        print_markdown(markdown)

        tracker.log(_flat_metrics(results, retention))
        rows = [
            {"task": task, "metric": metric, "value": value}
            for task, metrics in results["tasks"].items()
            for metric, value in metrics.items()
            if not metric.split(",", 1)[0].endswith("_stderr")
        ]
        rows += [{"task": f"ppl:{c}", "metric": "nll", "value": v} for c, v in results["nll"].items()]
        tracker.log_table("evaluation", rows)
    finally:
        tracker.finish()
    seconds = round(time.perf_counter() - start, 1)
    log.info("evaluation of %s done in %.1fs; outputs in %s", name, seconds, out_dir)
    return {"results": results, "retention": retention, "output_dir": str(out_dir), "seconds": seconds}


main = hydra_entry("evaluate", run)

if __name__ == "__main__":
    main()
