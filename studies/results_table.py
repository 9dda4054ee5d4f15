"""The results tables of README.md and docs/results.md, printed as Markdown from a finished
run's `summary.tsv` (one seed: 95% CIs from each experiment's `metrics.tsv`) or from
`multiseed/summary.tsv` (mean ± sd over seeds), so that every number there can be checked
against the run.

    python studies/results_table.py results            # one seed, with CIs
    python studies/results_table.py results/multiseed  # mean ± sd over the study's seeds"""
import sys
from pathlib import Path

import pandas as pd

LABELS = {"base": "base (stage 1)", "same_mag_scratch": "same_mag_scratch (check: from scratch)",
          "random_init": "random_init (floor)", "color_stats": "color_stats (floor)",
          "supervised": "supervised (positive control, labels)"}
COLUMNS = ["BA(10->10)", "BA(10->40)", "BA(40->40)", "Rcc(10->40)", "BA(10->40) mag-centred", "BA(2.5->10)",
           "BA(2.5->40)", "AMI(2.5)", "AMI(10)", "AMI(40)", "mag_leakage", "Δhier(10->40)", "Δhier(2.5->10)",
           "Δhier(2.5->40)"]
WITH_CI = {"BA(10->40)": ("probe_ba", "10->40"), "Δhier(10->40)": ("delta_hier", "10->40")}


def main(folder: str) -> None:
    folder = Path(folder)
    summary = pd.read_csv(folder / "summary.tsv", sep="\t").set_index("experiment")
    multi = int(summary["n_runs"].max()) > 1
    results = folder.parent if multi else folder
    cols = [c for c in COLUMNS if c in summary.columns]
    print("| experiment | seeds | " + " | ".join(cols) + " |")
    print("|---" * (len(cols) + 2) + "|")
    for exp, row in summary.iterrows():
        cells = []
        for c in cols:
            if multi:
                cells.append(f"{row[c]:.3f} ± {row[c + ' sd']:.3f}" if pd.notna(row[c + " sd"]) else f"{row[c]:.3f}")
            elif c in WITH_CI:
                m = pd.read_csv(results / exp / "metrics.tsv", sep="\t").set_index(["metric", "scope"])
                lo, hi = m.loc[WITH_CI[c], ["ci_low", "ci_high"]]
                cells.append(f"{row[c]:.3f} [{lo:.2f}, {hi:.2f}]")
            else:
                cells.append(f"{row[c]:.3f}")
        print(f"| {LABELS.get(exp, exp)} | {int(row['n_runs'])} | " + " | ".join(cells) + " |")
    checks = folder / "benchmark_checks.tsv"
    if checks.exists():
        print("\n| experiment | metric | value | check | passed |\n|---|---|---|---|---|")
        for _, r in pd.read_csv(checks, sep="\t").iterrows():
            print(f"| {r.experiment} | {r.metric} | {r.value:.3f} | {r.check.replace('|', chr(92) + '|')} | {r.passed} |")


if __name__ == "__main__":
    main(sys.argv[1])
