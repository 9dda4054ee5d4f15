"""One experiment's tidy table over its seeds, and a JSON summary (mean, sd, n)."""

import json
from pathlib import Path

import pandas as pd

from madflow.io import write_atomic
from madflow.runlog import setup

log = setup(snakemake.log[0])
table = pd.concat([pd.read_csv(p, sep="\t", keep_default_na=False, na_values=[""]) for p in snakemake.input.metrics])
stats = table.groupby(["metric", "scope"])["value"].agg(["mean", "std", "count"]).reset_index()
summary = {
    f"{r.metric}[{r.scope}]": {"mean": r.mean, "sd": r.std, "n_seeds": int(r.count)}
    for r in stats.itertuples()
}
write_atomic(snakemake.output.summary, lambda t: Path(t).write_text(json.dumps(summary, indent=2)))
write_atomic(snakemake.output.metrics, lambda t: table.to_csv(t, sep="\t", index=False))
log.info("%d rows from %d seed(s)", len(table), table["seed"].nunique())
