"""Every slide of the manifest, used or rejected, with its tissue tiles and notes (report)."""

from pathlib import Path

import pandas as pd

from madflow.io import write_atomic
from madflow.manifest import slides_overview
from madflow.runlog import setup

log = setup(snakemake.log[0])
inp = snakemake.input
checked = pd.read_csv(inp.manifest, sep="\t", dtype=str, keep_default_na=False)
rejected = pd.read_csv(inp.rejected, sep="\t", dtype=str, keep_default_na=False)
tables = {Path(f).stem: pd.read_parquet(f, columns=["mag", "tissue"]) for f in inp.tables}
overview = slides_overview(checked, rejected, tables, snakemake.params.mags)
for row in overview[overview["notes"] != ""].itertuples():
    log.warning("%s (%s): %s", row.slide_id, row.status, row.notes)
write_atomic(snakemake.output.overview, lambda t: overview.to_csv(t, sep="\t", index=False))
