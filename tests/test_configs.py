"""Every entry point's config and every experiment composes; sweeps expand into the expected jobs."""

from __future__ import annotations

import pytest

from spear.paths import CONF_DIR

ENTRY_POINTS = ["train", "analyze", "merge", "evaluate", "pipeline", "assets"]
EXPERIMENTS = sorted(p.stem for p in (CONF_DIR / "experiment").glob("*.yaml"))
# Experiments for the CPT stage alone also run inside the pipeline.
TRAIN_EXPERIMENTS = ["freeze_top8", "freeze_last8"]


def _compose(name: str, overrides: list[str], hydra_cfg: bool = False):
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose(config_name=name, overrides=["paths.output_dir=/tmp/spear-compose", *overrides],
                       return_hydra_config=hydra_cfg)


@pytest.mark.parametrize("entry", ENTRY_POINTS)
def test_entry_point_config_composes_and_resolves(entry):
    from omegaconf import OmegaConf

    cfg = _compose(entry, [])
    assert cfg.task_name == entry
    missing = OmegaConf.missing_keys(cfg)
    assert missing <= {"adapted"}, f"unexpected required keys: {missing}"
    cfg.paths.output_dir = "/tmp/spear-compose"
    OmegaConf.to_container(cfg, resolve=True, throw_on_missing=False)


@pytest.mark.parametrize("entry", ENTRY_POINTS)
def test_no_experiment_placeholder_in_defaults(entry):
    from omegaconf import OmegaConf

    defaults = OmegaConf.to_container(OmegaConf.load(CONF_DIR / f"{entry}.yaml").defaults)
    assert not any("experiment" in str(d) for d in defaults), "experiments are appended with +experiment="


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_every_experiment_composes_with_the_pipeline(experiment):
    cfg = _compose("pipeline", [f"+experiment={experiment}"])
    assert cfg.policy.name and cfg.eval.name


@pytest.mark.parametrize("experiment", TRAIN_EXPERIMENTS)
def test_freeze_experiments_compose_with_train(experiment):
    cfg = _compose("train", [f"+experiment={experiment}"])
    assert cfg.freeze.k == 8
    assert cfg.freeze.mode == {"freeze_top8": "ranked", "freeze_last8": "last"}[experiment]


def _sweep_jobs(experiment: str) -> list[list[str]]:
    """The override lists Hydra's basic sweeper makes of an experiment's sweep params."""
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
    from hydra.core.override_parser.overrides_parser import OverridesParser

    cfg = _compose("pipeline", [f"+experiment={experiment}"], hydra_cfg=True)
    params = cfg.hydra.sweeper.params
    parsed = OverridesParser.create().parse_overrides([f"{k}={v}" for k, v in params.items()])
    return [job for batch in BasicSweeper.split_arguments(parsed, None) for job in batch]


def test_baseline_uniform_sweep_expands_into_one_job_per_t():
    jobs = _sweep_jobs("baseline_uniform")
    assert jobs == [[f"policy.t={t}"] for t in ("0.25", "0.5", "0.75", "1.0")]
    for job in jobs:
        cfg = _compose("pipeline", ["+experiment=baseline_uniform", *job])
        assert cfg.policy.name == "uniform"
        assert cfg.policy.non_layer_t == cfg.policy.t == float(job[0].split("=")[1])


def test_impact_proxy_sweep_covers_every_proxy_and_the_controls():
    jobs = _sweep_jobs("ablation_impact_proxy")
    impacts = [job[0].split("=")[1] for job in jobs]
    assert {"random", "position", "combined"} <= set(impacts)
    for impact in impacts:
        assert _compose("pipeline", ["+experiment=ablation_impact_proxy", f"impact={impact}"]).impact.name == impact
