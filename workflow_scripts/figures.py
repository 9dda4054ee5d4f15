"""Every figure of the report, from the tidy tables and evaluation artifacts."""

from pathlib import Path

import pandas as pd

from madflow import figures as fig
from madflow.io import read_tsv
from madflow.manifest import read_checked_manifest
from madflow.runlog import setup

log = setup(snakemake.log[0])
inp, p = snakemake.input, snakemake.params
out = Path(snakemake.output.figures)
out.mkdir(parents=True, exist_ok=True)


def with_experiment(paths):
    return pd.concat([pd.read_parquet(f).assign(experiment=e) for e, f in zip(p.experiments, paths)], ignore_index=True)


metrics = pd.concat([read_tsv(f) for f in inp.metrics], ignore_index=True)
manifest = read_checked_manifest(inp.manifest)
test_slides = sorted(manifest.loc[manifest["split"] == "test", "slide_id"].astype(str))
tiles = pd.concat([pd.read_parquet(f) for f in inp.tables], ignore_index=True)

written = []
written += fig.retention_bars(metrics, out / "retention_bars")
written += fig.clustering_bars(metrics, out / "clustering_bars")
written += fig.delta_hier_dist(with_experiment(inp.delta_hier), out / "delta_hier")
written += fig.training_curves({e: read_tsv(f) for e, f in p.train_logs.items()}, out / "training_curves")
written += fig.tiling_qc(inp.qc, out / "tiling_qc")
for exp, pca, pred in zip(p.experiments, inp.pca, inp.predictions):
    first_seed = metrics[(metrics["experiment"] == exp) & (metrics["seed"] == p.seed)]
    written += fig.probe_heatmap(first_seed, exp, out / f"probe_heatmap_{exp}")
    written += fig.embedding_map(pd.read_parquet(pca), out / f"embedding_map_{exp}", title=exp)
    if test_slides:
        slide = tiles[tiles["slide_id"].astype(str) == test_slides[0]]
        written += fig.segmentation_maps(pd.read_parquet(pred), slide, test_slides[0], out / f"segmentation_{exp}")
for path in written:
    log.info("wrote %s", path)
Path(snakemake.output.done).write_text("\n".join(written) + "\n")
