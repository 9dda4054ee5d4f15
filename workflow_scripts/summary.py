"""Cross-experiment comparison table (mean and sd over seeds, with the notes of its headline
metrics), the benchmark's checks and the cross-scale cue each experiment's network had when its
training started."""

import json
from pathlib import Path

import pandas as pd

from madflow.io import read_tsv, write_atomic
from madflow.runlog import setup
from madflow.summary import benchmark_checks, headline_notes, summary_table

log = setup(snakemake.log[0])
tables = [read_tsv(p) for p in snakemake.input.metrics]
summary = summary_table(tables)
metrics = pd.concat(tables, ignore_index=True)
summary["notes"] = [headline_notes(metrics[metrics["experiment"].astype(str) == e]) for e in summary["experiment"]]
write_atomic(snakemake.output.summary, lambda t: summary.to_csv(t, sep="\t", index=False))
log.info("\n%s", summary.to_string())

n_classes = max(len(json.loads(Path(p).read_text()).get("classes") or []) for p in snakemake.input.evaluations)
checks = benchmark_checks(summary, n_classes) if n_classes >= 2 else pd.DataFrame()
write_atomic(snakemake.output.checks, lambda t: checks.to_csv(t, sep="\t", index=False))
log.info("benchmark checks (%d classes):\n%s", n_classes, checks.to_string(index=False))

cues = []
for path in snakemake.input.cues:
    run = Path(path).parent
    cue = read_tsv(path)
    cues.append(cue.assign(experiment=run.parent.name, seed=int(run.name.removeprefix("seed"))))
cues = pd.concat(cues, ignore_index=True) if cues else pd.DataFrame()
write_atomic(snakemake.output.cues, lambda t: cues.to_csv(t, sep="\t", index=False))
