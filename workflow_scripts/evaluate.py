"""Every metric (docs/metrics.md) for one experiment and seed."""

import json
from pathlib import Path

import h5py
import numpy as np
import pandas as pd

from madflow.features import find_embedding_files, load_embeddings
from madflow.io import write_atomic
from madflow.manifest import read_checked_manifest
from madflow.metrics import evaluate, tidy
from madflow.runlog import setup
from madflow.sample_size import flag_small_samples

log = setup(snakemake.log[0])
p = snakemake.params
manifest = read_checked_manifest(snakemake.input.manifest)
embedding_files = find_embedding_files(snakemake.input.embeddings, snakemake.input.tables)
tiles, X = load_embeddings(embedding_files, snakemake.input.tables)
tiles["split"] = tiles["slide_id"].map(manifest.set_index("slide_id")["split"])
log.info("%d embedded tiles, %d slides, dim %d", len(tiles), tiles["slide_id"].nunique(), X.shape[1])
ev = p.evaluate
metrics, artifacts = evaluate(
    tiles,
    X,
    magnifications=p.mags,
    min_purity=p.min_purity,
    n_bootstrap=ev["n_bootstrap"],
    cv_folds=ev["cv_folds"],
    seed=p.seed,
    threads=snakemake.threads,
)
metrics = flag_small_samples(metrics, artifacts)  # no CI and a note where too few slides or tiles
with h5py.File(embedding_files[0], "r") as h5:
    encoder = str(h5.attrs["encoder"])
table = tidy(metrics, snakemake.wildcards.experiment, encoder)
table["seed"] = int(snakemake.wildcards.seed)  # after the tidy columns: several seeds, one table
for row in table.itertuples():
    log.info("%s %s = %.4f [%.4f, %.4f] %s", row.metric, row.scope, row.value, row.ci_low, row.ci_high, row.note)
summary = {
    "experiment": snakemake.wildcards.experiment,
    "seed": int(snakemake.wildcards.seed),
    "encoder": encoder,
    "labelled": bool(artifacts.get("labelled")),
    "classes": list(artifacts.get("classes") or []),
    "split": artifacts.get("split"),
    "probe_C": artifacts.get("probe_C"),
    "metrics": {f"{r.metric}[{r.scope}]": (None if np.isnan(r.value) else r.value) for r in table.itertuples()},
}
write_atomic(snakemake.output.summary, lambda t: Path(t).write_text(json.dumps(summary, indent=2, default=str)))
for name in ("predictions", "pca", "delta_hier"):
    frame = artifacts.get(name)
    frame = frame if isinstance(frame, pd.DataFrame) else pd.DataFrame()
    write_atomic(getattr(snakemake.output, name), lambda t, f=frame: f.to_parquet(t, index=False))
write_atomic(snakemake.output.metrics, lambda t: table.to_csv(t, sep="\t", index=False))
