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
    ("BA(10->40)", "probe_ba", "10->40"),
    ("R(10->40)", "retention", "10->40"),
    ("Rcc(10->40)", "retention_cc", "10->40"),
    ("R(2.5->40)", "retention", "2.5->40"),
    ("Rcc(2.5->40)", "retention_cc", "2.5->40"),
    ("AMI(global)", "ami", "global"),
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
