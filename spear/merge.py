"""``python -m spear.merge adapted=<model> ranking=<ranking.json>``: restore by policy (SPEC §1.5, §2.5).
Writes model/, merge_report.json and mergekit.yaml. The stage: :mod:`spear.merging.stage`."""

from spear.cli import hydra_entry

main = hydra_entry("merge", "spear.merging.stage:run_merge")

if __name__ == "__main__":
    main()
