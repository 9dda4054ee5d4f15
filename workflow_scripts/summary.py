"""Cross-experiment comparison table (mean and sd over seeds)."""

from madflow.io import read_tsv, write_atomic
from madflow.runlog import setup
from madflow.summary import summary_table

log = setup(snakemake.log[0])
tables = [read_tsv(p) for p in snakemake.input.metrics]
summary = summary_table(tables)
write_atomic(snakemake.output.summary, lambda t: summary.to_csv(t, sep="\t", index=False))
log.info("\n%s", summary.to_string())
