"""Which metrics rest on too few slides or tiles to be read as they stand.

`madflow.metrics.evaluate` computes every metric it can; this module reads the tiles each
metric actually used (from evaluate's artifacts) and, where they are too few, removes the CI
that cannot be estimated and says so in the metric's note:

- slide-bootstrap CIs (probe, retention, segmentation) need at least `MIN_CI_SLIDES` test
  slides with tiles in the metric's scope: a bootstrap over one slide resamples that slide
  with itself, so every interval has zero width;
- Δhier CIs (bootstrap over parents) need at least `MIN_CI_SLIDES` parents;
- k-means metrics (AMI, Davies-Bouldin, magnification leakage) on fewer than
  `MIN_TILES_PER_CLUSTER` tiles per cluster keep their value but carry a note (4 tiles in 4
  clusters give AMI = 1 whatever the encoder).
"""

from __future__ import annotations

import numpy as np
import pandas as pd

MIN_CI_SLIDES = 2
MIN_TILES_PER_CLUSTER = 10
SLIDE_BOOTSTRAP_METRICS = {"probe_ba", "probe_f1", "retention", "retention_cc", "seg_consistency", "seg_miou"}
LABELLED_SCOPE_METRICS = {"probe_ba", "probe_f1", "retention", "retention_cc", "seg_miou"}
PARENT_BOOTSTRAP_METRICS = {"delta_hier", "sim_aligned", "sim_random"}
CLUSTER_METRICS = {"ami", "dbi", "mag_leakage"}


def flag_small_samples(metrics: pd.DataFrame, artifacts: dict) -> pd.DataFrame:
    """`metrics` (evaluate's table) with CIs removed and notes added where too few test
    slides, parents or tiles stand behind a value."""
    out = metrics.copy()
    preds = artifacts.get("predictions")
    preds = preds if isinstance(preds, pd.DataFrame) else pd.DataFrame(columns=["slide_id", "mag", "label"])
    kmeans = artifacts.get("kmeans")
    kmeans = kmeans if isinstance(kmeans, pd.DataFrame) else pd.DataFrame(columns=["scope", "cluster"])
    dh = artifacts.get("delta_hier")
    dh = dh if isinstance(dh, pd.DataFrame) else pd.DataFrame(columns=["pair"])
    n_clusters = len(artifacts.get("classes") or []) if artifacts.get("labelled") else kmeans.groupby("scope")["cluster"].nunique().max()
    for i, row in out.iterrows():
        if not np.isfinite(row["value"]):
            continue
        note = ""
        if row["metric"] in SLIDE_BOOTSTRAP_METRICS:
            mag = float(str(row["scope"]).split("->")[-1])
            at_mag = preds[np.isclose(preds["mag"].astype(float), mag)]
            labelled = row["metric"] in LABELLED_SCOPE_METRICS
            if labelled:
                at_mag = at_mag[at_mag["label"].notna()]
            n = at_mag["slide_id"].nunique()
            if n < MIN_CI_SLIDES:
                what = "labelled test slide" if labelled else "test slide"
                note = (f"no CI: {n} {what}(s) with tiles at {row['scope'].split('->')[-1]}x "
                        f"(a bootstrap over slides needs >= {MIN_CI_SLIDES})")
        elif row["metric"] in PARENT_BOOTSTRAP_METRICS:
            n = int((dh["pair"] == row["scope"]).sum())
            if n < MIN_CI_SLIDES:
                note = f"no CI: {n} parent tile(s) (a bootstrap over parents needs >= {MIN_CI_SLIDES})"
        elif row["metric"] in CLUSTER_METRICS:
            n = int((kmeans["scope"] == row["scope"]).sum())
            if n < MIN_TILES_PER_CLUSTER * n_clusters:
                note = (f"few tiles: k-means of {n} tiles into {n_clusters} clusters "
                        f"(< {MIN_TILES_PER_CLUSTER} per cluster); the value says little")
        if note:
            if note.startswith("no CI"):
                out.loc[i, ["ci_low", "ci_high"]] = np.nan
            out.loc[i, "note"] = "; ".join(filter(None, [row["note"], note]))
    return out
