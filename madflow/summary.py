"""Tables over runs: statistics over seeds, the one-row-per-experiment summary table and
an experiment's JSON summary. Every place that averages seeds uses ``run_stats``."""

from __future__ import annotations

from typing import Sequence

import numpy as np
import pandas as pd


def run_stats(values) -> tuple[float, float, int]:
    """(mean, sample sd, n) of the finite values of one metric over runs; NaN where undefined
    (no finite value; sd with fewer than two)."""
    v = pd.to_numeric(pd.Series(values), errors="coerce").to_numpy(float)
    v = v[np.isfinite(v)]
    mean = v.mean() if len(v) else np.nan
    sd = v.std(ddof=1) if len(v) > 1 else np.nan
    return mean, sd, len(v)


def seed_summary(table: pd.DataFrame) -> dict:
    """``{"metric[scope]": {"mean", "sd", "n_seeds"}}`` of one experiment's tidy table."""
    out = {}
    for (metric, scope), g in table.groupby(["metric", "scope"], sort=True):
        mean, sd, n = run_stats(g["value"])
        out[f"{metric}[{scope}]"] = {"mean": mean, "sd": sd, "n_seeds": n}
    return out


#: (column, metric, scope) of the one-row-per-experiment summary
SUMMARY_METRICS = [
    ("BA(10->10)", "probe_ba", "10->10"),
    ("BA(10->40)", "probe_ba", "10->40"),
    ("BA(40->40)", "probe_ba", "40->40"),
    ("BA(2.5->40)", "probe_ba", "2.5->40"),
    ("R(10->40)", "retention", "10->40"),
    ("Rcc(10->40)", "retention_cc", "10->40"),
    ("R(2.5->40)", "retention", "2.5->40"),
    ("Rcc(2.5->40)", "retention_cc", "2.5->40"),
    ("BA(10->40) mag-centred", "probe_ba_magcentred", "10->40"),
    ("mag_offset(10->40)", "mag_offset", "10->40"),
    ("AMI(global)", "ami", "global"),
    ("AMI(2.5)", "ami", "2.5"),
    ("AMI(10)", "ami", "10"),
    ("AMI(40)", "ami", "40"),
    ("DBI(global)", "dbi", "global"),
    ("mag_leakage", "mag_leakage", "global"),
    ("Δhier(2.5->10)", "delta_hier", "2.5->10"),
    ("Δhier(10->40)", "delta_hier", "10->40"),
    ("Δhier(2.5->40)", "delta_hier", "2.5->40"),
    ("seg_consistency(10->40)", "seg_consistency", "10->40"),
    ("seg_miou(40)", "seg_miou", "40"),
]


def summary_table(tidy_dfs: Sequence[pd.DataFrame] | pd.DataFrame, formatted: bool = False,
                  metrics: Sequence[tuple[str, str, str]] = SUMMARY_METRICS) -> pd.DataFrame:
    """One row per experiment (in order of appearance) with the headline metrics.

    Runs of the same experiment (a ``seed`` column, or several tables) are averaged; the
    ``<col> sd`` columns hold the sample sd (NaN with one run) and ``n_runs`` the count.
    With ``formatted=True`` each cell is a string ``"0.912 ± 0.010"`` (or ``"0.912"`` with
    one run, ``"n/a"`` when not applicable).
    """
    if isinstance(tidy_dfs, pd.DataFrame):
        tidy_dfs = [tidy_dfs]
    parts = []
    for i, d in enumerate(tidy_dfs):
        d = d.copy()
        if "experiment" not in d.columns:
            d["experiment"] = f"experiment_{i}"
        if "seed" in d.columns:
            d["_run"] = [f"{i}:{s}" for s in d["seed"]]
        else:
            d["_run"] = str(i)
        parts.append(d)
    if not parts:
        return pd.DataFrame(columns=["experiment", "n_runs"] + [m[0] for m in metrics])
    all_df = pd.concat(parts, ignore_index=True)
    rows = []
    for e in dict.fromkeys(all_df["experiment"].astype(str)):
        g = all_df[all_df["experiment"].astype(str) == e]
        row = {"experiment": e}
        if "encoder" in g.columns:
            row["encoder"] = ",".join(dict.fromkeys(g["encoder"].astype(str)))
        row["n_runs"] = g["_run"].nunique()
        for col, metric, scope in metrics:
            mu, sd, n = run_stats(g.loc[(g["metric"] == metric) & (g["scope"].astype(str) == scope), "value"])
            if formatted:
                row[col] = "n/a" if not n else f"{mu:.3f} ± {sd:.3f}" if n > 1 else f"{mu:.3f}"
            else:
                row[col] = mu
                row[f"{col} sd"] = sd
        rows.append(row)
    return pd.DataFrame(rows)


def headline_notes(table: pd.DataFrame) -> str:
    """Distinct notes of an experiment's headline metrics (why a value is missing, has no CI
    or rests on few tiles), so that the summary and the report say it beside the numbers."""
    notes: dict = {}
    for column, metric, scope in SUMMARY_METRICS:
        rows = table[(table["metric"] == metric) & (table["scope"].astype(str) == scope)]
        for note in rows["note"].fillna(""):
            if note:
                notes.setdefault(note, []).append(column)
    return " | ".join(f"{', '.join(dict.fromkeys(cols))}: {note}" for note, cols in notes.items())


# The benchmark's own checks, fixed before MAD's numbers are looked at: the floors at chance,
# single-scale self-supervision that does not transfer, a labelled control that does.
# (experiment, column, test, threshold); a test is "within" (|value - chance| <= threshold),
# "at_most" or "at_least".
BENCHMARK_CHECKS = [
    ("color_stats", "BA(10->40)", "within", 0.1),
    ("random_init", "BA(10->40)", "within", 0.1),
    ("same_mag_scratch", "Rcc(10->40)", "at_most", 0.5),
    ("supervised", "Rcc(10->40)", "at_least", 0.8),
]


def benchmark_checks(summary: pd.DataFrame, n_classes: int) -> pd.DataFrame:
    """One row per check: value, bound, pass; a check whose experiment this run did not
    include (the default target runs a subset) says so, with no value and no verdict."""
    chance = 1.0 / n_classes
    rows = []
    for experiment, column, test, threshold in BENCHMARK_CHECKS:
        row = summary[summary["experiment"] == experiment]
        value = float(row[column].iloc[0]) if not row.empty else float("nan")
        if test == "within":
            ok, bound = abs(value - chance) <= threshold, f"|x - {chance:.3f}| <= {threshold}"
        elif test == "at_most":
            ok, bound = value <= threshold, f"<= {threshold}"
        else:
            ok, bound = value >= threshold, f">= {threshold}"
        if row.empty:
            passed = f"not run (not in this run's experiments: snakemake study or exp_{experiment})"
        else:
            passed = bool(ok) if np.isfinite(value) else False
        rows.append({"experiment": experiment, "metric": column, "value": value, "check": bound,
                     "passed": passed})
    return pd.DataFrame(rows, columns=["experiment", "metric", "value", "check", "passed"])
