"""The evaluate stage: lm-eval tasks + the NLL proxies of one model, and retention against references.

Writes into the run dir: ``results.json`` (SPEC §2.6), ``results.md`` (the tables, also printed)
and, when ``references.base`` is given, ``retention.json``. A reference is a ``results.json``
(or a run dir holding one) from the same eval suite, or a model ref that is evaluated now with
the same suite (its results are saved as ``references/<role>_results.json``). W&B
(``logger=wandb``, offline by default) gets lm-eval's own report plus the proxy and retention numbers.
"""

from __future__ import annotations

import gc
import json
import logging
import time
from pathlib import Path
from typing import Any

from spear.errors import SpearError

log = logging.getLogger(__name__)
ROLES = ("base", "adapted")


def load_on_device(ref: str, model_cfg, device: str):
    """(model, tokenizer) of ``ref`` with the ``model`` group's loading options, on ``device``."""
    from spear.models import load_model

    model, tokenizer = load_model(ref, **model_cfg.load_options())
    return model.to(device), tokenizer


def load_results_file(path: Path, role: str) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise SpearError(f"references.{role}={path}: not a readable results.json ({err})") from None
    if not isinstance(data, dict) or "tasks" not in data or "perplexity" not in data:
        raise SpearError(f"references.{role}={path} is not a spear results.json (no tasks/perplexity keys)")
    data.setdefault("nll", {})
    return data


def _results_path(ref: str) -> Path | None:
    """The results.json a reference names (a file or a run dir holding one), or None for a model ref."""
    path = Path(ref).expanduser()
    if path.is_file() and path.suffix == ".json":
        return path
    if path.is_dir() and (path / "results.json").is_file():
        return path / "results.json"
    return None


def check_reference(ref: str | None, role: str, cfg) -> None:
    """A results.json reference must cover the suite's tasks and corpora (checked before evaluating)."""
    path = _results_path(ref) if ref else None
    if path is None:
        return  # none, or a model ref: evaluated later with this very suite
    data = load_results_file(path, role)
    missing = [t for t in cfg.eval.tasks if t not in data["tasks"]]
    missing += [f"perplexity:{c.name}" for c in (cfg.proxy.general, cfg.proxy.domain) if c.name not in data["nll"]]
    if missing:
        raise SpearError(
            f"references.{role} ({path}) lacks {', '.join(missing)}: it comes from another suite; evaluate the {role} "
            f"model with eval={cfg.eval.name}, or point references.{role} to a model ref so that it is evaluated now"
        )


def reference_results(ref: str | None, role: str, cfg, device: str, done: dict[str, dict]) -> dict[str, Any] | None:
    """A reference's results: read from a results.json / run dir, or evaluated now from a model ref."""
    from spear.evaluation.harness import evaluate_model
    from spear.io.atomic import write_json_atomic

    if ref is None:
        return None
    if ref not in done:
        path = _results_path(ref)
        if path is not None:
            done[ref] = load_results_file(path, role)
        else:
            log.info("evaluating references.%s = %s with eval=%s", role, ref, cfg.eval.name)
            model, tokenizer = load_on_device(ref, cfg.model, device)
            done[ref] = evaluate_model(model, tokenizer, cfg.eval, cfg.proxy, ref, progress=cfg.progress)
            del model
            gc.collect()
            write_json_atomic(Path(cfg.paths.output_dir) / "references" / f"{role}_results.json", done[ref])
    return done[ref]


def _flat_metrics(results: dict[str, Any], retention: dict[str, Any] | None) -> dict[str, float]:
    flat = {f"perplexity/{c}": v for c, v in results["perplexity"].items() if v is not None}
    flat.update({f"nll/{c}": v for c, v in results["nll"].items()})
    if retention:
        flat.update({f"retention/{k}": v for k, v in retention["retention"].items() if v is not None})
        flat.update({k: retention[k] for k in ("general_retention", "domain_gain_preservation") if retention.get(k) is not None})
    return flat


def run_evaluate(cfg) -> dict[str, Any]:
    """Evaluate ``cfg.model`` on ``cfg.eval`` and ``cfg.proxy``; retention when ``references.base`` is set."""
    from spear.config import save_run_config
    from spear.evaluation.harness import check_suite, evaluate_model
    from spear.evaluation.retention import retention_from_suite
    from spear.evaluation.tables import print_markdown, results_markdown, retention_markdown
    from spear.io.atomic import write_json_atomic, write_text_atomic
    from spear.runtime import resolve_device
    from spear.tracking import start_tracker

    start = time.perf_counter()
    out_dir = Path(cfg.paths.output_dir)
    refs = cfg.references
    if refs.adapted is not None and refs.base is None:
        raise SpearError("references.adapted is set but references.base is not: retention needs the base model")
    check_suite(cfg.eval, cfg.proxy)
    for role in ROLES:
        check_reference(getattr(refs, role), role, cfg)
    device = resolve_device(cfg.device)
    name = cfg.name or cfg.model.ref
    model, tokenizer = load_on_device(cfg.model.ref, cfg.model, device)  # bad refs fail before any output
    out_dir.mkdir(parents=True, exist_ok=True)
    tracker = start_tracker(cfg)

    def _to_wandb(raw: dict[str, Any]) -> None:
        from lm_eval.loggers import WandbLogger as LmEvalWandb

        try:
            wandb_logger = LmEvalWandb()  # attaches to the run the tracker opened
            wandb_logger.post_init(raw)
            wandb_logger.log_eval_result()
        except Exception as err:  # logging must never lose an evaluation
            log.warning("lm-eval's WandbLogger failed (%s); results.json is unaffected", err)

    try:
        from pytorch_lightning.loggers import WandbLogger

        to_wandb = _to_wandb if isinstance(tracker.logger, WandbLogger) else None
        results = evaluate_model(model, tokenizer, cfg.eval, cfg.proxy, name, progress=cfg.progress, lm_eval_callback=to_wandb)
        del model
        gc.collect()
        results["seconds"]["total"] = round(time.perf_counter() - start, 3)
        save_run_config(cfg, out_dir)
        write_json_atomic(out_dir / "results.json", results)

        retention = None
        done = {cfg.model.ref: results}
        base = reference_results(refs.base, "base", cfg, device, done)
        adapted = reference_results(refs.adapted, "adapted", cfg, device, done)
        if base is not None:
            retention = retention_from_suite(results, base, adapted, cfg.eval, cfg.proxy)
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
