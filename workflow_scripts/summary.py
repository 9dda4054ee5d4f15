"""Cross-experiment comparison table (mean and sd over seeds)."""

import pandas as pd

from madflow.io import read_tsv, write_atomic
from madflow.runlog import setup
from madflow.summary import SUMMARY_METRICS, summary_table


def headline_notes(table: pd.DataFrame) -> str:
    """Distinct notes of an experiment's headline metrics (why a value is missing, has no CI
    or rests on few tiles), so that the summary and the report say it beside the numbers."""
    notes = {}
    for column, metric, scope in SUMMARY_METRICS:
        rows = table[(table["metric"] == metric) & (table["scope"].astype(str) == scope)]
        for note in rows["note"].fillna(""):
            if note:
                notes.setdefault(note, []).append(column)
    return " | ".join(f"{', '.join(dict.fromkeys(cols))}: {note}" for note, cols in notes.items())


log = setup(snakemake.log[0])
tables = [read_tsv(p) for p in snakemake.input.metrics]
summary = summary_table(tables)
metrics = pd.concat(tables, ignore_index=True)
summary["notes"] = [headline_notes(metrics[metrics["experiment"].astype(str) == e]) for e in summary["experiment"]]
write_atomic(snakemake.output.summary, lambda t: summary.to_csv(t, sep="\t", index=False))
log.info("\n%s", summary.to_string())
