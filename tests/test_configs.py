"""Every entry point's config and every experiment composes and validates; an experiment's own
overrides take effect; sweeps expand into the expected jobs; every key is documented."""

from __future__ import annotations

import pytest
from omegaconf import OmegaConf

from spear.config import compose
from spear.paths import CONF_DIR

ENTRY_POINTS = ["train", "analyze", "merge", "evaluate", "pipeline", "assets"]
EXPERIMENTS = sorted(p.stem for p in (CONF_DIR / "experiment").glob("*.yaml"))
# Experiments for the CPT stage alone also run inside the pipeline.
TRAIN_EXPERIMENTS = ["freeze_top8", "freeze_last8"]
OUT = "paths.output_dir=/tmp/spear-compose"


def _raw(name: str, overrides: list[str], hydra_cfg: bool = False):
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    from spear.config import register

    register()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return hydra_compose(config_name=name, overrides=[OUT, *overrides], return_hydra_config=hydra_cfg)


def _leaves(node: dict, prefix: str = ""):
    for key, value in node.items():
        if isinstance(value, dict) and value:
            yield from _leaves(value, f"{prefix}{key}.")
        else:
            yield f"{prefix}{key}", value


def _at(data: dict, key: str):
    for part in key.split("."):
        data = data[part]
    return data


@pytest.mark.parametrize("entry", ENTRY_POINTS)
def test_entry_point_config_composes_and_validates(entry):
    cfg = compose(entry, [OUT, *(["adapted=x"] if entry in ("analyze", "merge") else [])])
    assert cfg.task_name == entry and cfg.paths.output_dir == "/tmp/spear-compose"


@pytest.mark.parametrize("entry", ["analyze", "merge"])
def test_adapted_is_required(entry):
    from spear.errors import SpearError

    with pytest.raises(SpearError, match="adapted is required; set adapted="):
        compose(entry, [OUT])


@pytest.mark.parametrize("entry", ENTRY_POINTS)
def test_no_experiment_placeholder_in_defaults(entry):
    defaults = OmegaConf.to_container(OmegaConf.load(CONF_DIR / f"{entry}.yaml").defaults)
    assert not any("experiment" in str(d) for d in defaults), "experiments are appended with +experiment="


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_every_experiment_composes_and_its_overrides_take_effect(experiment):
    """Each group the experiment overrides holds that option, and each value it sets is the composed value."""
    raw = OmegaConf.to_container(OmegaConf.load(CONF_DIR / "experiment" / f"{experiment}.yaml"))
    groups = {k.removeprefix("override /"): v for entry in raw.pop("defaults", []) for k, v in entry.items()}
    raw.pop("hydra", None)
    set_here = dict(_leaves(raw))  # what the experiment sets itself (interpolations resolve elsewhere)
    values = {k: v for k, v in set_here.items() if not (isinstance(v, str) and "${" in v)}
    assert groups or values, "an experiment that changes nothing"
    for stage in ["pipeline", *(["train"] if experiment in TRAIN_EXPERIMENTS else [])]:
        cfg = compose(stage, [OUT, f"+experiment={experiment}"]).model_dump(mode="json")
        for group, option in groups.items():
            expected = compose(stage, [OUT, f"{group}={option}"]).model_dump(mode="json")[group]
            mine = {k: v for k, v in _leaves(cfg[group]) if f"{group}.{k}" not in set_here}
            assert mine == {k: v for k, v in _leaves(expected) if f"{group}.{k}" not in set_here}, (stage, group)
        for key, value in values.items():
            assert _at(cfg, key) == value, (stage, key)


def _sweep_jobs(experiment: str) -> list[list[str]]:
    """The override lists Hydra's basic sweeper makes of an experiment's sweep params."""
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
    from hydra.core.override_parser.overrides_parser import OverridesParser

    cfg = _raw("pipeline", [f"+experiment={experiment}"], hydra_cfg=True)
    params = cfg.hydra.sweeper.params
    parsed = OverridesParser.create().parse_overrides([f"{k}={v}" for k, v in params.items()])
    return [job for batch in BasicSweeper.split_arguments(parsed, None) for job in batch]


def test_baseline_uniform_is_the_three_seed_sweep_with_a_layers_only_point():
    cfg = compose("pipeline", [OUT, "+experiment=baseline_uniform"])
    assert cfg.pipeline.seeds == [1234, 1235, 1236] and cfg.pipeline.frontier.ts == [0.0, 0.25, 0.5, 0.75, 1.0]
    assert cfg.policy.name == "uniform" and cfg.policy.t == 0.5 and cfg.policy.non_layer_t == 0.0
    assert cfg.policy.label == "uniform_layers_t0.5"  # not the sweep's whole-model uniform_t0.5


def test_impact_proxy_sweep_covers_every_proxy_and_the_controls():
    jobs = _sweep_jobs("ablation_impact_proxy")
    impacts = [job[0].split("=")[1] for job in jobs]
    assert {"random", "position", "combined"} <= set(impacts)
    for impact in impacts:
        assert compose("pipeline", [OUT, "+experiment=ablation_impact_proxy", f"impact={impact}"]).impact.name == impact


def test_the_pipeline_takes_every_stage_key_under_the_stage_name():
    """One config: keys of the train/analyze/merge/eval groups are set on the pipeline as on the stages."""
    from spear.config.stages import AnalyzeRun, TrainRun

    cfg = compose("pipeline", [OUT, "optim.lr=1e-4", "trainer.max_steps=20", "impact=swci", "policy=aggressive",
                               "merge=linear", "eval=perplexity", "proxy.stride=128", "gradient_checkpointing=true"])
    assert (cfg.optim.lr, cfg.trainer["max_steps"], cfg.impact.name, cfg.policy.name, cfg.merge.name, cfg.eval.name) == (
        1e-4, 20, "swci", "aggressive", "linear", "perplexity")
    train = cfg.stage(TrainRun, "/tmp/t", seed=7)
    assert train.optim.lr == 1e-4 and train.trainer["max_steps"] == 20 and train.seed == 7 and train.gradient_checkpointing
    assert train.paths.output_dir == "/tmp/t" and train.checkpoint.enabled is False  # the pipeline's own default
    analysis = cfg.stage(AnalyzeRun, "/tmp/a", base="b", adapted="a")
    assert analysis.impact.name == "swci" and analysis.proxy.stride == 128 and analysis.merge.name == "linear"


def test_every_config_key_is_in_the_generated_table():
    """docs/CONFIG.md is generated from the schema and conf/ (python -m spear.config.table) and up to date."""
    from spear.config.table import config_table, yaml_keys
    from spear.paths import PROJECT_ROOT

    table = config_table()
    assert (PROJECT_ROOT / "docs" / "CONFIG.md").read_text() == table, "run `python -m spear.config.table`"
    for key in yaml_keys():
        assert f"`{key}`" in table, key
