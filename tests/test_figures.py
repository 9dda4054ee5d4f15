"""Every figure function writes a non-empty PNG and PDF from a small constructed input."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from madflow import figures as F
from madflow import metrics as M
from madflow.summary import summary_table

MAGS = [2.5, 10.0, 40.0]


def _tiles(labels=True, seed=0, n_slides=5, n_test=2, children=4, D=16, shift=0.0):
    """Small 3-level hierarchy (children per parent configurable), class-clustered."""
    rng = np.random.default_rng(seed)
    cent = rng.normal(size=(3, D))
    rows, feats = [], []
    for s in range(n_slides):
        for p in range(4):
            i, j = divmod(p, 2)
            c = (s + p) % 3
            g = int(np.sqrt(children))
            for lev, (k, m) in [(0, (None, None))] + \
                    [(1, (k, None)) for k in range(children)] + \
                    [(2, (k, m)) for k in range(children) for m in range(children)]:
                size = [1024, 1024 // g, 1024 // g // g][lev]
                x = j * 1024 + (k % g if k is not None else 0) * (1024 // g) + \
                    (m % g if m is not None else 0) * (1024 // g // g)
                y = i * 1024 + (k // g if k is not None else 0) * (1024 // g) + \
                    (m // g if m is not None else 0) * (1024 // g // g)
                rows.append(dict(slide_id=f"S{s}", mag=MAGS[lev], i=i, j=j, k=k, m=m,
                                 label=f"class{c}" if labels else None,
                                 label_purity=1.0 if labels else np.nan,
                                 split="test" if s < n_test else "train",
                                 x0=x, y0=y, size0=size))
                feats.append(cent[c] + shift * lev + 0.8 * rng.normal(size=D))
    t = pd.DataFrame(rows)
    t["k"], t["m"] = t["k"].astype("Int32"), t["m"].astype("Int32")
    X = np.asarray(feats, np.float32)
    return t, X / np.linalg.norm(X, axis=1, keepdims=True)


@pytest.fixture(scope="module")
def runs():
    out = {}
    for name, kw in [("mad", {}), ("shuffled", {"shift": 0.3, "seed": 1}),
                     ("external:foo", {"labels": False, "seed": 2})]:
        t, X = _tiles(**kw)
        df, art = M.evaluate(t, X, magnifications=MAGS, n_bootstrap=50, n_clusters=3)
        out[name] = (t, M.tidy(df, name, "enc"), art)
    return out


def _check(paths):
    assert len(paths) == 2
    for p in paths:
        p = Path(p)
        assert p.exists() and p.stat().st_size > 1000, p
    assert {Path(p).suffix for p in paths} == {".png", ".pdf"}
    # no temporary files left behind
    assert not [q for q in Path(paths[0]).parent.iterdir() if q.name.startswith(".")]


def test_palettes_consistent():
    a = F.experiment_palette(["mad", "tri", "external:x"])
    b = F.experiment_palette(["external:x", "color_stats", "mad"])
    assert a["mad"] == b["mad"] and a["external:x"] == b["external:x"]
    assert len(set(F.experiment_palette(F._KNOWN_EXPERIMENTS).values())) == len(F._KNOWN_EXPERIMENTS)
    mp = F.mag_palette([2.5, 10.0, 40, 20])
    assert set(mp) == {"2.5", "10", "40", "20"} and len(set(mp.values())) == 4


def test_probe_heatmap(runs, tmp_path):
    _check(F.probe_heatmap(runs["mad"][1], "mad", tmp_path / "probe_mad.png"))
    # label-free: still a figure (with the reason)
    _check(F.probe_heatmap(runs["external:foo"][1], "external:foo", tmp_path / "probe_ext"))


def test_retention_and_clustering_bars(runs, tmp_path):
    summ = pd.concat([r[1] for r in runs.values()], ignore_index=True)
    _check(F.retention_bars(summ, tmp_path / "retention"))
    _check(F.clustering_bars(summ, tmp_path / "clustering"))
    # several seeds -> mean +- sd
    seeds = pd.concat([runs["mad"][1].assign(seed=0),
                       runs["mad"][1].assign(seed=1, value=runs["mad"][1].value * 0.9)])
    _check(F.retention_bars(seeds, tmp_path / "retention_seeds"))


def test_embedding_map(runs, tmp_path):
    _check(F.embedding_map(runs["mad"][2]["pca"], tmp_path / "emb"))
    _check(F.embedding_map(runs["external:foo"][2]["pca"], tmp_path / "emb_nolab"))


def test_delta_hier_dist(runs, tmp_path):
    pp = pd.concat([r[2]["delta_hier"].assign(experiment=n) for n, r in runs.items()])
    _check(F.delta_hier_dist(pp, tmp_path / "dh"))
    _check(F.delta_hier_dist(runs["mad"][2]["delta_hier"], tmp_path / "dh_single"))


def test_segmentation_maps(runs, tmp_path):
    t, _, art = runs["mad"]
    _check(F.segmentation_maps(art["predictions"], t, "S0", tmp_path / "seg"))
    t, _, art = runs["external:foo"]
    _check(F.segmentation_maps(art["predictions"], t, "S1", tmp_path / "seg_nolab"))


def test_training_curves(tmp_path):
    steps = np.arange(0, 60)
    logs = {}
    for e, off in [("mad", 0.0), ("same_mag", 0.5)]:
        logs[e] = pd.DataFrame({
            "step": steps, "pair": np.where(steps % 2, "2.5->10", "10->40"),
            "loss": 5 - np.log1p(steps) + off, "lr": 1e-3, "wd": 0.04, "momentum": 0.99,
            "teacher_temp": 0.03, "teacher_entropy": 4 - 0.02 * steps,
            "kl_teacher_student": 1.0, "prototypes_used": 200 - steps, "seconds": 0.1})
    _check(F.training_curves(logs, tmp_path / "curves"))


def test_tiling_qc(tmp_path):
    from PIL import Image

    paths = []
    for i in range(3):
        img = np.full((64, 80, 3), 240, np.uint8)
        img[10:50, 10:60] = (60 + 40 * i, 170, 255)
        p = tmp_path / f"slide{i}.png"
        Image.fromarray(img).save(p)
        paths.append(p)
    _check(F.tiling_qc(paths, tmp_path / "qc" / "tiling_qc"))
    _check(F.tiling_qc([], tmp_path / "qc_empty"))


def test_tsv_roundtrip_inputs(runs, tmp_path):
    # the workflow reads metrics.tsv back with keep_default_na=False, na_values=[""]:
    # empty notes become NaN, and the label-free heatmap must still draw
    p = tmp_path / "m.tsv"
    runs["external:foo"][1].assign(seed=0).to_csv(p, sep="\t", index=False)
    back = pd.read_csv(p, sep="\t", keep_default_na=False, na_values=[""])
    _check(F.probe_heatmap(back, "external:foo", tmp_path / "h"))
    _check(F.clustering_bars(back, tmp_path / "c"))


def test_summary_table(runs):
    dfs = [r[1] for r in runs.values()]
    s = summary_table(dfs)
    assert s.experiment.tolist() == ["mad", "shuffled", "external:foo"]
    assert {"BA(10->40)", "R(10->40)", "Rcc(10->40)", "AMI(global)", "DBI(global)",
            "mag_leakage", "Δhier(10->40)"} <= set(s.columns)
    mad = runs["mad"][1]
    want = mad[(mad.metric == "retention") & (mad.scope == "10->40")].value.iloc[0]
    assert s.loc[0, "R(10->40)"] == pytest.approx(want)
    assert np.isnan(s.loc[2, "R(10->40)"])  # label-free
    assert np.isfinite(s.loc[2, "Δhier(10->40)"])
    # seeds: mean +- sd
    two = [mad.assign(seed=0), mad.assign(seed=1, value=mad.value + 0.1)]
    s2 = summary_table(two)
    assert len(s2) == 1 and s2.n_runs.iloc[0] == 2
    assert s2.loc[0, "R(10->40)"] == pytest.approx(want + 0.05)
    assert s2.loc[0, "R(10->40) sd"] == pytest.approx(np.std([want, want + 0.1], ddof=1))
    f = summary_table(two, formatted=True)
    assert "±" in f.loc[0, "R(10->40)"]
    assert summary_table(dfs, formatted=True).loc[2, "R(10->40)"] == "n/a"
