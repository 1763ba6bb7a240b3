"""``python -m spear.analyze adapted=<model>``: score and rank decoder layers (SPEC §1.2-1.4, §2.4).
Writes ranking.json, metrics.csv, layer_scores.png, unfrozen_parameters.yaml and timing.json.
The stage: :mod:`spear.analysis.stage`."""

from spear.cli import hydra_entry

main = hydra_entry("analyze", "spear.analysis.stage:run_analyze")

if __name__ == "__main__":
    main()
