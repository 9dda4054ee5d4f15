"""Aggregate the Snakemake benchmark files of the heavy rules (tile, pretrain, embed): per
rule, the number of jobs and the median / max / total wall time, CPU time and peak RSS."""

from pathlib import Path

import pandas as pd

from madflow.io import write_atomic
from madflow.runlog import setup

log = setup(snakemake.log[0])
rows = []
for path in sorted(Path(snakemake.params.folder).glob("*/*.tsv")):
    bench = pd.read_csv(path, sep="\t")
    bench.insert(0, "job", path.stem)
    bench.insert(0, "rule", path.parent.name)
    rows.append(bench)
jobs = pd.concat(rows, ignore_index=True)
table = jobs.groupby("rule").agg(
    jobs=("job", "count"),
    wall_s_median=("s", "median"),
    wall_s_max=("s", "max"),
    wall_s_total=("s", "sum"),
    cpu_s_total=("cpu_time", "sum"),
    max_rss_mb_median=("max_rss", "median"),
    max_rss_mb_max=("max_rss", "max"),
).round(2).reset_index()
log.info("\n%s", table.to_string(index=False))
write_atomic(snakemake.output.table, lambda t: table.to_csv(t, sep="\t", index=False))
