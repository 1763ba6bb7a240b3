"""Collect pipeline runs (one run, or every job of a multirun) into one recorded result.

``python -m spear.tracking.collate --experiment NAME RUN_DIR [RUN_DIR ...]`` writes
``experiments/NAME/README.md`` (the experiment's description and command from its config,
the results table, the policy-vs-control relations and the cost of every configuration) and
``experiments/NAME/pareto.png``. Everything in it is read from the runs' ``summary.json``:
results are produced by running, never typed.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from spear.errors import SpearError
from spear.io.location import machine_fault
from spear.paths import CONF_DIR, PROJECT_ROOT
from spear.tracking.summary import (
    PRIMARY_COLUMNS,
    frontier_columns,
    frontier_section,
    markdown_table,
    noisy_note,
    number,
    pareto_plot,
    raw_columns,
    relations_of,
    relations_table,
)

SHARED = ("base", "adapted")


def job_runs(paths: list[Path]) -> list[Path]:
    """Run dirs holding a summary.json: the paths themselves, or the jobs of a multirun dir."""
    runs: list[Path] = []
    for path in paths:
        if (path / "summary.json").exists():
            runs.append(path)
        else:
            runs.extend(sorted((p.parent for p in path.glob("*/summary.json")), key=lambda p: p.name))
    return runs


def _overrides(run_dir: Path) -> list[str]:
    from omegaconf import OmegaConf

    path = run_dir / ".hydra" / "overrides.yaml"
    return [str(o) for o in OmegaConf.load(path)] if path.exists() else []


def job_labels(runs: list[Path]) -> list[str]:
    """Per run, the overrides that differ between the runs (a sweep's ``merge=linear``); "" if one run."""
    overrides = [_overrides(run) for run in runs]
    common = set.intersection(*(set(o) for o in overrides)) if overrides else set()
    return [",".join(o for o in job if o not in common) for job in overrides]


def collect(runs: list[Path]) -> tuple[list[dict[str, Any]], list[dict[str, Any]], list[dict[str, Any]], list[int]]:
    """(entries, relations, cost rows, seeds): base/adapted once (the first job's), every other model
    per job, named ``<model> [<job label>]`` when the runs differ; relations as the pipeline draws them."""
    entries: list[dict[str, Any]] = []
    relations: list[dict[str, Any]] = []
    cost: list[dict[str, Any]] = []
    shared: dict[str, dict[str, Any]] = {}
    seeds: list[int] = []
    for run, label in zip(runs, job_labels(runs), strict=True):
        summary = read_summary(run)
        seeds = summary["seeds"]
        rename: dict[str, str] = {}
        job: list[dict[str, Any]] = []  # this job's models under their own names, base/adapted as shown
        for entry in summary["models"]:
            name = entry["name"]
            if name in SHARED:
                if name not in shared:
                    shared[name] = entry
                    entries.append(entry)
                job.append(shared[name])
                continue
            if label:
                rename[name] = f"{name} [{label}]"
            entries.append({**entry, "name": rename.get(name, name)})
            job.append(entry)
        relations += [{**r, "policy": rename.get(r["policy"], r["policy"]), "versus": rename.get(r["versus"], r["versus"])}
                      for r in relations_of(job)]
        c = summary["cost"]
        cost.append({"job": label or run.name, "cpt_seconds": c.get("cpt_seconds"),
                     "extra_policy_seconds": c.get("extra_policy_seconds"),
                     "extra_policy_vs_cpt": c.get("extra_policy_vs_cpt"), "wall_seconds": c.get("wall_seconds")})
    return entries, relations, cost, seeds


def run_setting(run: Path) -> str:
    """What the runs measured, read from the first run's resolved config: model, CPT corpus and recipe, the two axes."""
    import yaml

    try:
        cfg = yaml.safe_load((run / "config.yaml").read_text())
        trainer, optim, proxy = cfg["trainer"], cfg["optim"], cfg["proxy"]
        steps = f"{trainer['max_steps']} steps x {trainer.get('accumulate_grad_batches', 1)} x {cfg['data']['batch_size']} x " \
                f"{cfg['data']['block_size']} tokens at lr {optim['lr']:g}"
        return (f"model `{cfg['model']['ref']}`, CPT on `{', '.join(cfg['data']['paths'])}` ({steps}), general axis "
                f"`{proxy['general']['name']}`, domain axis `{proxy['domain']['name']}`")
    except (OSError, KeyError, TypeError, yaml.YAMLError):
        return "the runs' configs (unreadable here)"


def experiment_header(name: str) -> tuple[str, str]:
    """(description, command) from the comment block at the top of the experiment's config."""
    lines = (CONF_DIR / "experiment" / f"{name}.yaml").read_text().splitlines()
    comments = [line[1:].strip() for line in lines if line.startswith("#") and "@package" not in line]
    command = next((c for c in comments if c.startswith("python -m")), "")
    description = " ".join(c for c in comments if c and not c.startswith("python -m"))
    return description, command


def posterior_section(ranking_path: Path) -> str:
    """Markdown: each cheap proxy's Spearman correlation with a posterior ranking.json's measured
    impact (the ``impact`` options re-scored with their current definitions), and the per-layer
    measurements."""
    from spear.analysis.posterior import impact_presets
    from spear.analysis.ranking import Ranking
    from spear.analysis.scoring import proxy_correlations

    ranking = Ranking.load(ranking_path).document
    if "posterior" not in ranking:
        raise SpearError(f"{ranking_path} has no posterior measurements; run spear.analyze impact=posterior")
    layers = ranking["layers"]
    truth = [lay["posterior"]["score"] for lay in layers]
    corr = proxy_correlations(layers, truth, impact_presets())
    ref = ranking["posterior"]["reference"]
    tokens = ranking["posterior"]["corpora"]["tokens"]
    lines = [
        "## Cheap proxies vs the measured (posterior) impact",
        "",
        f"`impact=posterior` on the same CPT: each of the {len(layers)} layers restored alone (t=1) in memory, "
        f"general NLL on {tokens['general']} tokens of general text and domain NLL on {tokens['domain']} tokens "
        f"of held-out domain text (adapted: general {ref['adapted']['general']:.4f}, domain "
        f"{ref['adapted']['domain']:.4f}; base: general {ref['base']['general']:.4f}, domain "
        f"{ref['base']['domain']:.4f}). Spearman correlation of each proxy's layer score with the measured "
        "general recovery (`impact:<name>` rows are the `impact` options):",
        "",
        "| proxy | Spearman |",
        "|---|---|",
        *[f"| {k} | {number(v, 3)} |" for k, v in sorted(corr.items(), key=lambda kv: -(kv[1] if kv[1] is not None else -9))],
        "",
        "Per layer: general recovery (nats/token, > 0 = restoring it helps general text) and domain change "
        "(> 0 = restoring it costs domain).",
        "",
        "| layer | general recovery | domain change |",
        "|---|---|---|",
        *[f"| {lay['layer']} | {lay['posterior']['general_recovery']:+.4f} | {lay['posterior']['domain_change']:+.4f} |"
          for lay in layers],
        "",
    ]
    return "\n".join(lines)


def render(name: str, entries: list[dict[str, Any]], relations: list[dict[str, Any]], cost: list[dict[str, Any]],
           seeds: list[int], command: str, description: str, notes: str = "", sections: str = "",
           frontier: dict[str, Any] | None = None, setting: str = "the run's config") -> str:
    """The experiment's README.md: description, command, results (the pipeline's tables), relations, cost."""
    lines = [
        f"# {name}",
        "",
        description,
        "",
        "```bash",
        command or f"python -m spear.pipeline +experiment={name}",
        "```",
        "",
        f"Recorded with {setting}, CPT seeds {seeds}. Generated by "
        f"`python -m spear.tracking.collate --experiment {name} <run dirs>` from the runs' summary.json.",
        "",
        "## Results",
        "",
        markdown_table(entries, [*PRIMARY_COLUMNS, *frontier_columns(entries)]),
        "",
        *([*note, ""] if (note := noisy_note(entries)) else []),
        *frontier_section({"frontier": frontier, "models": entries}),
        "Raw metrics:",
        "",
        markdown_table(entries, raw_columns(entries)),
        "",
    ]
    if relations:
        lines += ["## Policy vs controls", "", relations_table(relations), ""]
    lines += ["## Cost", "", "| job | CPT s | extra policy s (merge + eval) | extra / CPT | wall s |", "|---|---|---|---|---|",
              *[f"| {c['job']} | {number(c['cpt_seconds'], 1)} | {number(c['extra_policy_seconds'], 1)} | "
                f"{number(c['extra_policy_vs_cpt'], 3)} | {number(c['wall_seconds'], 1)} |" for c in cost], "",
              "![pareto](pareto.png)", ""]
    if sections:
        lines += [sections, ""]
    if notes:
        lines += ["## Reading", "", notes, ""]
    return "\n".join(lines)


RECORD_FILES = ("README.md", "summary.json", "pareto.png")
RECORD_KEY = "collated_from"  # summary.json of a collated record: the run dirs it was made from


def check_record_dir(out: Path, overwrite: bool) -> None:
    """``out`` is new, or holds an earlier record of this command (replaced), or ``overwrite`` was asked:
    a README.md, summary.json or pareto.png of anyone else's is never replaced silently."""
    present = [name for name in RECORD_FILES if (out / name).exists()]
    if out.exists() and not out.is_dir():
        raise SpearError(f"--out {out} is a file; name a directory")
    if not present or overwrite:
        return
    try:
        ours = RECORD_KEY in json.loads((out / "summary.json").read_text())
    except (OSError, ValueError, TypeError):
        ours = False
    if not ours:
        raise SpearError(f"--out {out} already holds {', '.join(present)} that collate did not write; "
                         "pass --overwrite to replace them, or choose another --out")


def read_summary(run: Path) -> dict[str, Any]:
    """A pipeline run's summary.json, checked for what collate reads; a damaged one is one line naming it."""
    path = run / "summary.json"
    try:
        summary = json.loads(path.read_text())
        if not (isinstance(summary, dict) and isinstance(summary.get("models"), list)
                and all(isinstance(m, dict) and "name" in m for m in summary["models"])
                and isinstance(summary.get("cost"), dict) and "seeds" in summary):
            raise ValueError("no models/cost/seeds")
    except (OSError, ValueError) as err:
        raise SpearError(f"{path} is not a pipeline summary ({str(err).splitlines()[0]}); re-run that pipeline, "
                         "or leave the run out") from None
    return summary


def collate(args: argparse.Namespace) -> Path:
    from spear.io.atomic import write_json_atomic, write_text_atomic

    out = args.out or PROJECT_ROOT / "experiments" / args.experiment
    if not (CONF_DIR / "experiment" / f"{args.experiment}.yaml").exists():
        raise SpearError(f"--experiment {args.experiment}: no conf/experiment/{args.experiment}.yaml; name an experiment config")
    runs = job_runs(args.runs)
    if not runs:
        raise SpearError(f"no pipeline run in {', '.join(map(str, args.runs))} (a run dir holds summary.json); "
                         "name the run dirs, or the multirun dir, of spear.pipeline")
    check_record_dir(out, args.overwrite)
    entries, relations, cost, seeds = collect(runs)
    frontier = read_summary(runs[0]).get("frontier")  # the first job's uniform sweep
    description, command = experiment_header(args.experiment)
    command = args.command or command
    notes = args.notes.read_text() if args.notes else ""
    sections = posterior_section(args.posterior) if args.posterior else ""
    out.mkdir(parents=True, exist_ok=True)
    write_text_atomic(out / "README.md", render(args.experiment, entries, relations, cost, seeds, command, description, notes,
                                                sections, frontier, setting=run_setting(runs[0])))
    pareto_plot(entries, out / "pareto.png", title=args.experiment, frontier=frontier)
    write_json_atomic(out / "summary.json", {"models": entries, "relations": relations, "cost": cost, "frontier": frontier,
                                             RECORD_KEY: [str(run) for run in runs]})
    return out


def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", type=Path, help="pipeline run dirs or multirun dirs")
    parser.add_argument("--experiment", required=True, help="experiment name (conf/experiment/<name>.yaml)")
    parser.add_argument("--out", type=Path, default=None, help="default: experiments/<name>")
    parser.add_argument("--overwrite", action="store_true", help="replace a README.md/summary.json/pareto.png collate did not write")
    parser.add_argument("--notes", type=Path, default=None, help="a Markdown file with the reading of the results")
    parser.add_argument("--posterior", type=Path, default=None, help="a ranking.json (or run dir) of impact=posterior to correlate the proxies with")
    parser.add_argument("--command", default=None, help="the command that produced the runs (default: the config's)")
    args = parser.parse_args(argv)
    try:
        out = collate(args)
    except SpearError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    except OSError as err:
        fault = machine_fault(err)
        if fault is None:
            raise
        print(f"error: {fault}", file=sys.stderr)
        sys.exit(2)
    print(out / "README.md")
    return out


if __name__ == "__main__":
    main()
