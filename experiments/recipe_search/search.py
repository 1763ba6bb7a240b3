"""Score CPT recipes for the finance-news default on text that no record evaluates (issue 22).

For every trained model (``--model <recipe>/s<seed>=<model dir>``, or each ``--runs/<recipe>/s<seed>/model``) the uniform interpolation toward the base
is measured at ``t`` in {0, 0.25, 0.5, 0.75} (t=1, the base, once) on

* domain: the news **validation** articles (``finance_validation``; never trained on, never evaluated);
* general: the **calibration-only** GSM8K chat records (``general_chat`` ids >= 1000; no spear task evaluates them).

A recipe qualifies when the adapted model (t=0) has the lowest domain NLL of its sweep and its general
NLL is at least 0.05 nats above the base's. Writes ``results.json`` and ``results.md`` into ``--out``.

    python experiments/recipe_search/search.py --runs /work/recipe_runs --out experiments/recipe_search
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

TS = (0.0, 0.25, 0.5, 0.75)
TOKENS = 8192


def evaluators(tokenizer):
    from spear.config.schema import CorpusConfig, ProxyConfig
    from spear.evaluation.proxy import ProxyEvaluator

    proxy = ProxyConfig(domain=CorpusConfig(name="finance_validation", source="finance_validation", max_tokens=TOKENS))
    domain = ProxyEvaluator(tokenizer, proxy, roles=("domain",))
    general = ProxyEvaluator(tokenizer, proxy, roles=("general",), part="calibration", calibration_tokens=TOKENS,
                             knob="--tokens")
    return domain, general


def measure(model, domain, general) -> dict[str, float]:
    return {"domain": domain.nll(model)["domain"], "general": general.nll(model)["general"]}


def main() -> None:
    import torch

    from spear.merging.inmemory import InMemoryMerger
    from spear.merging.plan import TMap
    from spear.models import load_model
    from spear.models.loading import resolve_model_dir

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=Path, help="a dir of <recipe>/s<seed>/model dirs (spear.train runs)")
    parser.add_argument("--model", action="append", default=[], metavar="RECIPE/SEED=DIR", help="one trained model dir")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent)
    args = parser.parse_args()
    results_path = args.out / "results.json"
    results = json.loads(results_path.read_text()) if results_path.is_file() else {"runs": {}}
    base_dir = resolve_model_dir("smollm2_135m")
    base, tokenizer = load_model("smollm2_135m")
    domain, general = evaluators(tokenizer)
    with torch.no_grad():
        if "base" not in results:
            results["base"] = measure(base, domain, general)
    del base
    models = {f"{d.parent.parent.name}/{d.parent.name}": d for d in sorted(args.runs.glob("*/s*/model"))} if args.runs else {}
    models |= {key: Path(path) for key, path in (item.split("=", 1) for item in args.model)}
    for key, model_dir in models.items():
        if key in results["runs"]:
            continue
        start = time.perf_counter()
        model, _ = load_model(str(model_dir))
        merger = InMemoryMerger(model, base_dir, _slerp())
        sweep = {}
        with torch.no_grad():
            for t in TS:
                merger.apply(TMap.everywhere(merger.num_layers, t))
                sweep[str(t)] = measure(model, domain, general)
        merger.release()
        summary = json.loads((model_dir.parent / "train_summary.json").read_text())
        results["runs"][key] = {"sweep": sweep, "train_seconds": summary.get("seconds") or summary.get("wall_seconds"),
                                "eval_seconds": round(time.perf_counter() - start, 1)}
        print(key, json.dumps(sweep), flush=True)
        args.out.mkdir(parents=True, exist_ok=True)
        results_path.write_text(json.dumps(results, indent=1) + "\n")
    (args.out / "results.md").write_text(table(results))
    print(table(results))


def _slerp():
    from spear.config.schema import SlerpMerge

    return SlerpMerge()


def table(results: dict) -> str:
    base = results["base"]
    lines = [f"Base: validation-news NLL {base['domain']:.4f}, calibration-chat NLL {base['general']:.4f}.", "",
             "| recipe/seed | domain t=0 | t=0.25 | t=0.5 | t=0.75 | adapted domain-best | general cost (t=0 - base) | qualifies |",
             "|---|---|---|---|---|---|---|---|"]
    for key, run in sorted(results["runs"].items()):
        sweep = run["sweep"]
        doms = [sweep[str(t)]["domain"] for t in TS]
        best = doms[0] <= min(doms[1:] + [base["domain"]])
        cost = sweep["0.0"]["general"] - base["general"]
        lines.append(f"| {key} | " + " | ".join(f"{d:.4f}" for d in doms)
                     + f" | {'yes' if best else 'no'} ({doms[0] - min(doms[1:]):+.4f}) | {cost:+.4f} | "
                     + ("yes" if best and cost >= 0.05 else "no") + " |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
