"""The model card (``README.md``, Hugging Face format) of every model dir spear-mm writes.

A model that leaves the machine for a hub mirror or another trainer should say how it was made:
YAML front matter the hub reads (``base_model``, ``library_name``, ``tags``, the base's licence), then
what was done (the restoration table of a merge; corpus, steps and frozen layers of a CPT), the
sha256 of every weight file in and out, and the exact command and config that made it.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from spear.io.atomic import write_text_atomic
from spear.io.hashing import file_sha256

CARD = "README.md"
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".gguf")


def weight_digests(model_dir: Path) -> dict[str, str]:
    """``{file name: sha256}`` of the weight files of a model dir (a ``.gguf`` file: itself)."""
    path = Path(model_dir)
    files = [path] if path.is_file() else sorted(p for p in path.iterdir() if p.suffix in WEIGHT_SUFFIXES)
    return {p.name: file_sha256(p) for p in files}


def front_matter(readme: Path) -> dict[str, Any]:
    """The YAML front matter of a model card (``{}`` when there is none or it does not parse)."""
    import yaml

    if not readme.is_file():
        return {}
    text = readme.read_text(encoding="utf-8", errors="replace")
    if not text.startswith("---"):
        return {}
    head, sep, _ = text[3:].partition("\n---")
    try:
        data = yaml.safe_load(head) if sep else None
    except yaml.YAMLError:
        return {}
    return data if isinstance(data, dict) else {}


def base_licence(base_dir: Path) -> str | None:
    """The base model's licence: its card's ``license``, else the embedded asset manifest's ``licence``."""
    from spear.paths import spear_home as cache_root

    licence = front_matter(Path(base_dir) / CARD).get("license")
    if licence:
        return str(licence)
    manifest = cache_root() / "manifest.json"
    if manifest.is_file():
        for asset in json.loads(manifest.read_text()).get("assets", {}).values():
            if (cache_root() / asset.get("path", "")).resolve() == Path(base_dir).resolve():
                return asset.get("licence")
    return None


def _yaml_block(data: dict[str, Any]) -> str:
    import yaml

    return yaml.safe_dump(data, sort_keys=False, allow_unicode=True)


def _provenance(models: dict[str, Path], known: dict[str, dict[str, str]] | None = None) -> list[str]:
    """The digest table; ``known``: digests by role that the writer computed as it wrote (not re-read)."""
    lines = ["## Weights (sha256)", "", "| model | path | file | sha256 |", "|---|---|---|---|"]
    for role, path in models.items():
        digests = (known or {}).get(role) or weight_digests(path)
        for name, digest in digests.items():
            lines.append(f"| {role} | `{path}` | `{name}` | `{digest}` |")
    return [*lines, ""]


def command_line() -> str:
    """The command that is running: ``python -m <module> <args>`` for an entry point, else the script's."""
    spec = getattr(sys.modules.get("__main__"), "__spec__", None)
    program = f"python -m {spec.name}" if spec is not None else f"python {sys.argv[0] if sys.argv else ''}"
    return " ".join([program, *sys.argv[1:]])


def _made_by(config_yaml: str, version: str) -> list[str]:
    command = command_line()
    return ["## How it was made", "", f"spear-mm {version}; command: `{command}`", "",
            "The validated config of the run:", "", "```yaml", config_yaml.rstrip(), "```", ""]


def portable_paths(text: str, run_dir: Path) -> str:
    """``text`` with the machine's own paths made portable: the run dir's as ``.`` (relative to the run), the
    asset cache's as ``$SPEAR_HOME``, the rest of the home dir as ``~``. A card travels with the model: it
    should not carry a user name or a private directory layout."""
    from spear.paths import spear_home

    prefixes = [(str(Path(run_dir).resolve()), "."), (str(spear_home().resolve()), "$SPEAR_HOME"),
                (str(Path.home().resolve()), "~")]
    for prefix, name in sorted(prefixes, key=lambda pair: -len(pair[0])):
        if prefix not in ("/", "."):
            text = text.replace(prefix + "/", name + "/").replace(prefix + "`", name + "`").replace(prefix + "\n", name + "\n")
    return text


def card_text(meta: dict[str, Any], title: str, body: list[str], models: dict[str, Path], config_yaml: str,
              known: dict[str, dict[str, str]] | None = None, run_dir: Path | None = None) -> str:
    """The card: front matter ``meta`` (``None`` values left out), ``body`` lines, digests and the config;
    paths relative to ``run_dir`` (see :func:`portable_paths`)."""
    from spear import __version__

    head = _yaml_block({k: v for k, v in meta.items() if v is not None})
    text = "\n".join(["---", head.rstrip(), "---", "", f"# {title}", "", *body, *_provenance(models, known),
                      *_made_by(config_yaml, __version__)])
    return portable_paths(text, run_dir) if run_dir is not None else text


def _code_line(code: dict[str, list[str]]) -> list[str]:
    """Whether the adapted dir's own Python code (``auto_map``) travelled with the merge, and why."""
    if code.get("copied"):
        return [f"- custom code copied (model.trust_remote_code=true): {', '.join(f'`{n}`' for n in code['copied'])}; "
                "loading this model runs it"]
    if code.get("left_out"):
        return [f"- custom code not copied: {', '.join(f'`{n}`' for n in code['left_out'])} (set "
                "model.trust_remote_code=true to copy it)"]
    return []


def write_merge_card(model_dir: Path, report: dict[str, Any], base_dir: Path, adapted_dir: Path, config_yaml: str) -> Path:
    """``model/README.md`` of a merge: what was restored, by which policy, kernel and ranking."""
    ranking = report.get("ranking") or {}
    impact = (ranking.get("impact") or {}).get("name") if isinstance(ranking.get("impact"), dict) else None
    policy = report["policy"]
    group_t = report.get("group_t")
    rows = ["| layer | t |" + (" attn t | mlp t |" if group_t else ""), "|---|---|" + ("---|---|" if group_t else "")]
    for layer, t in sorted(report["layer_t"].items(), key=lambda kv: int(kv[0])):
        groups = ""
        if group_t:
            groups = " " + " | ".join(f"{group_t.get(f'{layer}.{g}', 0.0):.3f}" for g in ("attn", "mlp")) + " |"
        rows.append(f"| {layer} | {float(t):.3f} |{groups}")
    body = [
        f"A restoration of `{adapted_dir}` (continually pre-trained) toward its base `{base_dir}` by SPEAR-MM: each unit "
        "interpolated back toward the base with strength t (0 keeps the adapted weights, 1 returns the base's).",
        "",
        f"- policy: `{policy['name']}`" + (f" (`{policy['label']}`)" if policy.get("label") else ""),
        f"- kernel: `{report['method']}` {json.dumps(report.get('kernel_params') or {})}",
        f"- ranking proxy: `{impact}`" if impact else "- ranking: none (this policy needs none)",
        f"- mean t: {report['mean_t']:.3f}; embeddings, final norm, lm_head: t = {report['non_layer_t']:.3f}",
        *_code_line(report.get("code_files") or {}),
        "",
        *rows,
        "",
        "## Evaluation",
        "",
        "Not evaluated by the merge. `python -m spear.evaluate model.ref=<this dir> references.base=<base> "
        "references.adapted=<adapted>` measures it with general retention and domain-gain preservation.",
        "",
    ]
    meta = {"base_model": str(base_dir), "library_name": "transformers", "tags": ["spear-mm", "merge"],
            "license": base_licence(base_dir)}
    text = card_text(meta, f"SPEAR-MM merge of {Path(adapted_dir).name}", body,
                     {"base": Path(base_dir), "adapted": Path(adapted_dir), "output": Path(model_dir)}, config_yaml,
                     known={"output": report.get("sha256") or {}}, run_dir=Path(model_dir).parent)
    return write_text_atomic(Path(model_dir) / CARD, text)


def write_train_card(model_dir: Path, summary: dict[str, Any], base_dir: Path, config_yaml: str) -> Path:
    """``model/README.md`` of a CPT run: corpus, steps, tokens, frozen layers."""
    data = summary.get("data") or {}
    frozen = summary.get("frozen_layers") or []
    body = [
        f"Continual pre-training of `{base_dir}` by spear-mm.",
        "",
        f"- corpus: {', '.join(f'`{s}`' for s in data.get('sources', [])) or 'n/a'} ({data.get('num_tokens', 'n/a')} tokens, "
        f"blocks of {data.get('block_size', 'n/a')})",
        f"- steps: {summary.get('steps')}; tokens seen: {summary.get('tokens_seen')}; seed: {summary.get('seed')}",
        f"- frozen decoder layers: {frozen if frozen else 'none'} ({summary.get('frozen_params', 0)} of "
        f"{summary.get('total_params', 0)} parameters frozen)",
        f"- final metrics: {json.dumps(summary.get('final_metrics') or {})}",
        "",
    ]
    meta = {"base_model": str(base_dir), "library_name": "transformers", "tags": ["spear-mm", "continual-pretraining"],
            "license": base_licence(base_dir)}
    text = card_text(meta, f"spear-mm continual pre-training of {Path(base_dir).name}", body,
                     {"base": Path(base_dir), "output": Path(model_dir)}, config_yaml, run_dir=Path(model_dir).parent)
    return write_text_atomic(Path(model_dir) / CARD, text)
