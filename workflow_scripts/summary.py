"""Cross-experiment comparison table (mean and sd over seeds)."""

import pandas as pd

from madflow.figures import summary_table
from madflow.io import write_atomic
from madflow.runlog import setup

log = setup(snakemake.log[0])
tables = [pd.read_csv(p, sep="\t", keep_default_na=False, na_values=[""]) for p in snakemake.input.metrics]
summary = summary_table(tables)
write_atomic(snakemake.output.summary, lambda t: summary.to_csv(t, sep="\t", index=False))
log.info("\n%s", summary.to_string())
