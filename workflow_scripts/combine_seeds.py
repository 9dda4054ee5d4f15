"""One experiment's tidy table over its seeds, and a JSON summary (mean, sd, n)."""

import json
from pathlib import Path

import pandas as pd

from madflow.io import read_tsv, write_atomic
from madflow.runlog import setup
from madflow.summary import seed_summary

log = setup(snakemake.log[0])
table = pd.concat([read_tsv(p) for p in snakemake.input.metrics])
summary = seed_summary(table)
write_atomic(snakemake.output.summary, lambda t: Path(t).write_text(json.dumps(summary, indent=2)))
write_atomic(snakemake.output.metrics, lambda t: table.to_csv(t, sep="\t", index=False))
log.info("%d rows from %d seed(s)", len(table), table["seed"].nunique())
