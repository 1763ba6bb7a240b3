"""``python -m spear.evaluate``: lm-eval tasks + the general/domain perplexity of one model, and
retention against reference models (SPEC §1.6, §2.6). The stage: :mod:`spear.evaluation.stage`."""

from spear.cli import hydra_entry

main = hydra_entry("evaluate", "spear.evaluation.stage:run_evaluate")

if __name__ == "__main__":
    main()
