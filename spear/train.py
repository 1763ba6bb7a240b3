"""``python -m spear.train``: continual pretraining (CPT) with an optional layer-freeze mask.
Writes model/, train_summary.json, trainable_parameters.txt, config.yaml and checkpoints/.
The stage: :mod:`spear.cpt.stage`."""

from spear.cli import hydra_entry

main = hydra_entry("train", "spear.cpt.stage:run_train")

if __name__ == "__main__":
    main()
