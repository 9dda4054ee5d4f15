"""The results tables of README.md and docs/results.md, printed as Markdown from a finished
run's `summary.tsv` (one seed: 95% CIs from each experiment's `metrics.tsv`), from
`multiseed/summary.tsv` (mean ± sd over seeds), or from a study archived seed by seed in
`studies/runs/<study>` (studies/archive_run.py), so that every number there can be checked.

    python studies/results_table.py results            # one seed, with CIs
    python studies/results_table.py results/multiseed  # mean ± sd over the study's seeds
    python studies/results_table.py studies/runs/STUDY [--seeds 1 2 3]   # the archive

An archive's seeds are combined only when their run.json carry one configuration hash (per
experiment, where the archive has `experiment_sha256`); the table says which seeds,
configuration and commits it combines. For an archive it then prints
the study's goal, fixed before its seeds ran: each method's raw BA(10->40) against each
control, seed by seed, "above" where the gap of the means exceeds the larger of the two seed
standard deviations, and the method's Rcc(10->40) against 0.5; beside it the median half-width
of the method's per-seed 95% CI, since with two or three seeds a spread can be smaller than
what one evaluation resolves."""
import argparse
import json
import sys
from pathlib import Path

import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from madflow.summary import summary_table  # noqa: E402

LABELS = {"base": "base (stage 1)", "same_mag_scratch": "same_mag_scratch (check: from scratch)",
          "random_init": "random_init (floor)", "color_stats": "color_stats (floor)",
          "supervised": "supervised (positive control, labels)"}
COLUMNS = ["BA(10->10)", "BA(10->40)", "BA(40->40)", "Rcc(10->40)", "BA(10->40) mag-centred", "mag_offset(10->40)",
           "BA(2.5->10)",
           "BA(2.5->40)", "AMI(2.5)", "AMI(10)", "AMI(40)", "mag_leakage", "Δhier(10->40)", "Δhier(2.5->10)",
           "Δhier(2.5->40)"]
# the study's goal (issue: MAD's alignment must reach the encoder), fixed before seeds 1-3 ran
GOAL_METHODS = ("mad", "mad_teacher_all")
GOAL_CONTROLS = ("base", "same_mag", "shuffled", "interp")
GOAL_RCC = 0.5
WITH_CI = {"BA(10->40)": ("probe_ba", "10->40"), "Δhier(10->40)": ("delta_hier", "10->40")}


def archive_summary(folder: Path, seeds: list[int] | None) -> pd.DataFrame:
    """The summary (mean ± sd) of an archived study's seeds; refuses to mix configurations."""
    runs = {int(p.parent.name[4:]): json.loads(p.read_text()) for p in sorted(folder.glob("seed*/run.json"))}
    if seeds:
        missing = sorted(set(seeds) - set(runs))
        if missing:
            raise SystemExit(f"{folder}: seed(s) {missing} not archived (have {sorted(runs)})")
        runs = {s: r for s, r in runs.items() if s in seeds}
    print(f"<!-- {folder}: seeds {sorted(runs)}, {configuration(folder, runs)}, commits "
          f"{sorted({c for r in runs.values() for c in r['commit']})}, CPUs {sorted({r['cpu'] for r in runs.values()})} -->")
    tables = [pd.read_csv(p, sep="\t") for s in runs for p in sorted((folder / f"seed{s}").glob("*/metrics.tsv"))]
    return summary_table(tables), tables


def configuration(folder: Path, runs: dict) -> str:
    """The configuration the seeds share, said for the table's header; SystemExit where they do
    not. Archives with a hash per experiment are compared experiment by experiment (a study may
    gain an experiment between seeds); older ones by the whole configuration."""
    experiments = [r.get("experiments") or {} for r in runs.values()]
    if all(experiments) and all("experiment_sha256" in e for exp in experiments for e in exp.values()):
        hashes: dict[str, dict] = {}
        for seed, run in runs.items():
            for name, entry in run["experiments"].items():
                hashes.setdefault(name, {})[seed] = entry["experiment_sha256"]
        differing = {name: {s: h[:12] for s, h in by_seed.items()}
                     for name, by_seed in hashes.items() if len(set(by_seed.values())) > 1}
        if differing:
            raise SystemExit(f"{folder}: experiment(s) {sorted(differing)} ran under different configurations "
                             f"across seeds {differing}: pick seeds of one with --seeds")
        return "configuration per experiment " + ", ".join(
            f"{name} {next(iter(by_seed.values()))[:12]}" for name, by_seed in sorted(hashes.items()))
    whole = {r["config_sha256"] for r in runs.values()}
    if len(whole) != 1 or None in whole:
        raise SystemExit(f"{folder}: the seeds ran under different configurations "
                         f"{ {s: (r['config_sha256'] or '')[:12] for s, r in runs.items()} }: pick seeds of one with --seeds")
    return f"configuration {whole.pop()[:12]}"


def per_seed(tables: list[pd.DataFrame], metric: str, scope: str, value: str = "value") -> pd.DataFrame:
    """One metric's value (or its CI half-width: value="ci_half") per seed (rows) and
    experiment (columns)."""
    rows = pd.concat(tables)
    rows = rows[(rows["metric"] == metric) & (rows["scope"].astype(str) == scope)].copy()
    rows["ci_half"] = (rows["ci_high"] - rows["ci_low"]) / 2
    return rows.pivot_table(index="seed", columns="experiment", values=value)


def goal_rows(ba: pd.DataFrame, method: str, controls=GOAL_CONTROLS, ci_half: pd.DataFrame | None = None) -> list[dict]:
    """The method's BA(10->40) against each control over the seeds both ran: the gap of the
    means, the seed spread (the larger sd) and the paired per-seed differences; with
    `ci_half`, also the median half-width of the method's per-seed 95% CI (test-slide
    bootstrap): a gap below it is within what one evaluation cannot tell apart."""
    rows = []
    for control in controls:
        if control not in ba:
            continue
        both = ba[[method, control]].dropna()
        m, c = both[method], both[control]
        spread = max(m.std(), c.std()) if len(both) > 1 else float("nan")
        gap = m.mean() - c.mean()
        rows.append({"control": control, "seeds": len(both), "method": f"{m.mean():.3f} ± {m.std():.3f}",
                     "control_value": f"{c.mean():.3f} ± {c.std():.3f}", "gap": gap, "spread": spread,
                     "differences": " / ".join(f"{d:+.3f}" for d in m - c),
                     "above": bool(len(both) > 1 and gap > spread),
                     "ci_half": float(ci_half[method].loc[both.index].median())
                     if ci_half is not None and method in ci_half else float("nan")})
    return rows


def training_end(folder: Path, ba: pd.DataFrame, last: int = 50) -> pd.DataFrame:
    """Per archived run (the seeds and experiments of `ba`, BA(10->40) from per_seed), the
    means of the last `last` logged steps of the teacher's entropy, the teacher-student KL and
    the batch's parent/child offset, beside the run's raw BA(10->40): where a teacher flattens
    towards uniform (entropy -> ln K), what it can teach flattens too."""
    rows = []
    for seed in ba.index:
        for log in sorted((folder / f"seed{seed}").glob("*/train_log.tsv")):
            steps = pd.read_csv(log, sep="\t")
            if len(steps) == 0 or "teacher_entropy" not in steps or log.parent.name not in ba:
                continue
            tail = steps.tail(last)
            rows.append({"experiment": log.parent.name, "seed": seed, "BA(10->40)": float(ba.loc[seed, log.parent.name]),
                         "teacher entropy": tail["teacher_entropy"].mean(), "KL": tail["kl_teacher_student"].mean(),
                         "batch offset": tail["mag_offset"].mean() if "mag_offset" in tail else float("nan")})
    return pd.DataFrame(rows)


def print_training_end(folder: Path, ba: pd.DataFrame) -> None:
    end = training_end(folder, ba)
    if end.empty:
        return
    print("\n**Training end** (means of the last 50 logged steps; per seed: " + ", ".join(map(str, ba.index)) + ")\n")
    print("| experiment | BA(10->40) | teacher entropy | teacher-student KL | batch offset |\n|---|---|---|---|---|")
    for exp, runs in end.groupby("experiment"):
        cells = [" / ".join(f"{v:.3f}" if pd.notna(v) else "-" for v in runs[c])
                 for c in ("BA(10->40)", "teacher entropy", "KL", "batch offset")]
        print(f"| {exp} | " + " | ".join(cells) + " |")


def print_goal(tables: list[pd.DataFrame], ba: pd.DataFrame) -> None:
    rcc = per_seed(tables, "retention_cc", "10->40")
    offset = per_seed(tables, "mag_offset", "10->40")
    ci_half = per_seed(tables, "probe_ba", "10->40", value="ci_half")
    for method in (m for m in GOAL_METHODS if m in ba):
        print(f"\n**Goal, `{method}`** (raw BA(10->40), seeds {sorted(ba[method].dropna().index)}): "
              f"Rcc(10->40) {rcc[method].mean():.3f} ± {rcc[method].std():.3f} "
              f"({'>=' if rcc[method].mean() >= GOAL_RCC else '<'} {GOAL_RCC}), offset ratio "
              f"{offset[method].mean():.3f} ± {offset[method].std():.3f}\n")
        print(f"| control | seeds | {method} | control | gap of means | seed spread (larger sd) | "
              "per-seed difference | above by more than the spread | per-seed 95% CI half-width |"
              "\n|---|---|---|---|---|---|---|---|---|")
        for r in goal_rows(ba, method, ci_half=ci_half):
            print(f"| {r['control']} | {r['seeds']} | {r['method']} | {r['control_value']} | {r['gap']:+.3f} | "
                  f"{r['spread']:.3f} | {r['differences']} | {'yes' if r['above'] else 'no'} | {r['ci_half']:.3f} |")


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("folder")
    ap.add_argument("--seeds", nargs="*", type=int, help="archive: the seeds to combine (default: all archived)")
    args = ap.parse_args(argv)
    folder = Path(args.folder)
    tables = None
    if any(folder.glob("seed*/run.json")):
        summary, tables = archive_summary(folder, args.seeds)
        summary = summary.set_index("experiment")
    else:
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
            elif c in WITH_CI and (results / exp / "metrics.tsv").is_file():
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
    if tables is not None:
        ba = per_seed(tables, "probe_ba", "10->40")
        print_goal(tables, ba)
        print_training_end(folder, ba)


if __name__ == "__main__":
    main()
