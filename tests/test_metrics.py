"""Tests for madflow.metrics: every metric on constructed embeddings with a known answer."""
from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import balanced_accuracy_score, f1_score, jaccard_score

from madflow import metrics as M

MAGS = [2.5, 10.0, 40.0]


def make_tiles(n_slides=8, parents_per_slide=4, n_classes=3, mags=MAGS, D=32, mode="class",
               noise=0.3, n_test=3, seed=0, labels=True, children=16, split=True):
    """Toy hierarchy: every 2.5x parent has ``children`` 10x children, each with ``children``
    40x grandchildren; the class is constant below a parent.  ``mode``: ``class`` (embedding =
    class centroid + noise, identical across magnifications), ``mag`` (magnification centroid
    + noise, no class information), ``noise``."""
    rng = np.random.default_rng(seed)
    cent = rng.normal(size=(n_classes, D))
    magv = rng.normal(size=(len(mags), D))
    rows, feats = [], []
    for s in range(n_slides):
        sid = f"S{s:02d}"
        for p in range(parents_per_slide):
            i, j = divmod(p, 4)
            c = (s + p) % n_classes

            def add(level, k, m):
                base = {"class": cent[c], "mag": magv[level], "noise": 0 * cent[c]}[mode]
                feats.append(base + noise * rng.normal(size=D))
                k_ = 0 if k is None else k
                m_ = 0 if m is None else m
                rows.append(dict(
                    slide_id=sid, mag=float(mags[level]), i=i, j=j, k=k, m=m,
                    label=f"class{c}" if labels else None,
                    label_purity=1.0 if labels else np.nan,
                    split=("test" if s < n_test else "train"),
                    x0=j * 4096 + (k_ % 4) * 1024 * (k is not None) + (m_ % 4) * 256 * (m is not None),
                    y0=i * 4096 + (k_ // 4) * 1024 * (k is not None) + (m_ // 4) * 256 * (m is not None),
                    size0=[4096, 1024, 256][level]))

            add(0, None, None)
            for k in range(children):
                add(1, k, None)
                for m in range(children):
                    add(2, k, m)
    t = pd.DataFrame(rows)
    t["k"] = t["k"].astype("Int32")
    t["m"] = t["m"].astype("Int32")
    if not split:
        t = t.drop(columns="split")
    X = np.asarray(feats, np.float32)
    X /= np.linalg.norm(X, axis=1, keepdims=True)
    return t, X


def val(df, metric, scope):
    r = df[(df.metric == metric) & (df.scope == scope)]
    assert len(r) == 1, (metric, scope)
    return float(r.value.iloc[0])


@pytest.fixture(scope="module")
def clean():
    t, X = make_tiles(mode="class", noise=0.3)
    return t, X, *M.evaluate(t, X, magnifications=MAGS, n_bootstrap=200)


@pytest.fixture(scope="module")
def noisy():
    t, X = make_tiles(mode="class", noise=2.0, n_slides=10, n_test=4, seed=3)
    return t, X, *M.evaluate(t, X, magnifications=MAGS, n_bootstrap=300, seed=1)


def test_mag_str():
    assert [M.mag_str(m) for m in (2.5, 10.0, 40, 1.25)] == ["2.5", "10", "40", "1.25"]
    assert M.pair_str(10.0, 40.0) == "10->40"


def test_scopes_and_names(clean):
    _, _, df, _ = clean
    assert list(df.columns) == M.METRIC_COLUMNS
    pairs = [f"{a}->{b}" for a in ("2.5", "10", "40") for b in ("2.5", "10", "40")]
    expect = {
        "probe_ba": pairs, "probe_f1": pairs, "retention": pairs, "retention_cc": pairs,
        "ami": ["global", "2.5", "10", "40"], "dbi": ["global", "2.5", "10", "40"],
        "mag_leakage": ["global"],
        "delta_hier": ["2.5->10", "10->40", "2.5->40"],
        "sim_aligned": ["2.5->10", "10->40", "2.5->40"],
        "sim_random": ["2.5->10", "10->40", "2.5->40"],
        "seg_consistency": ["2.5->10", "2.5->40", "10->40"],
        "seg_miou": ["2.5", "10", "40"],
        "probe_ba_magcentred": [p for p in pairs if p.split("->")[0] != p.split("->")[1]],
        "retention_cc_magcentred": [p for p in pairs if p.split("->")[0] != p.split("->")[1]],
        "mag_offset": ["2.5->10", "2.5->40", "10->40"],
        "mag_offset_spread": ["2.5->10", "2.5->40", "10->40"],
    }
    for metric, scopes in expect.items():
        got = df.loc[df.metric == metric, "scope"].tolist()
        assert sorted(got) == sorted(scopes), metric
    assert set(df.metric) == set(expect)
    assert not df.duplicated(["metric", "scope"]).any()
    # a fully labelled run has a value everywhere and no note
    assert df.value.notna().all()
    assert (df.note == "").all()


def test_identical_embeddings_invariant(clean):
    _, _, df, art = clean
    for a in ("2.5", "10", "40"):
        for b in ("2.5", "10", "40"):
            assert val(df, "probe_ba", f"{a}->{b}") > 0.99
    assert val(df, "retention", "10->40") == pytest.approx(1.0, abs=0.01)
    assert val(df, "retention", "10->10") == 1.0
    assert val(df, "retention_cc", "10->40") == pytest.approx(1.0, abs=0.01)
    assert val(df, "ami", "global") > 0.95
    assert abs(val(df, "mag_leakage", "global")) < 0.05
    for p in ("2.5->10", "10->40", "2.5->40"):
        assert val(df, "seg_consistency", p) > 0.99
        assert val(df, "delta_hier", p) > 0.1  # class differs between parents of a slide
    for m in ("2.5", "10", "40"):
        assert val(df, "seg_miou", m) > 0.99
    assert art["labelled"] is True
    assert set(art) >= {"predictions", "pca", "delta_hier", "kmeans", "split", "classes"}


def test_magcentred_probe_removes_exactly_a_per_magnification_offset():
    """Class structure shared across scales behind a constant 40x shift: the probe fitted at
    10x fails at 40x, the mag-centred diagnostic recovers the transfer; without the shift
    the two agree."""
    t, X = make_tiles(mode="class", noise=0.3)
    shift = np.random.default_rng(7).normal(size=X.shape[1]) * 3.0
    shifted = X + np.where(t["mag"].to_numpy()[:, None] == 40.0, shift, 0.0)
    df, _ = M.evaluate(t, shifted, magnifications=MAGS, n_bootstrap=50)
    assert val(df, "probe_ba", "10->40") < 0.7
    assert val(df, "probe_ba_magcentred", "10->40") > 0.95
    assert val(df, "retention_cc_magcentred", "10->40") > 0.9
    df, _ = M.evaluate(t, X, magnifications=MAGS, n_bootstrap=50)
    assert abs(val(df, "probe_ba_magcentred", "10->40") - val(df, "probe_ba", "10->40")) < 0.05


def test_mag_offset_is_the_shift_over_the_class_spacing():
    """A known 40x shift: mag_offset(10->40) = |shift| / mean distance between the 10x class
    means (as computed by hand), ~0 without the shift; the label-free twin follows it."""
    t, X = make_tiles(mode="class", noise=0.3)
    shift = np.random.default_rng(7).normal(size=X.shape[1])
    shift *= 0.8 / np.linalg.norm(shift)
    shifted = X + np.where(t["mag"].to_numpy()[:, None] == 40.0, shift, 0.0)
    df, _ = M.evaluate(t, shifted, magnifications=MAGS, n_bootstrap=20)
    test = (t["split"] == "test").to_numpy()
    at10, at40 = test & (t["mag"] == 10.0).to_numpy(), test & (t["mag"] == 40.0).to_numpy()
    means = np.array([shifted[at10 & (t["label"] == c).to_numpy()].mean(0) for c in sorted(t["label"].unique())])
    between = np.mean([np.linalg.norm(means[i] - means[j]) for i in range(3) for j in range(i + 1, 3)])
    offset = np.linalg.norm(shifted[at40].mean(0) - shifted[at10].mean(0))
    assert val(df, "mag_offset", "10->40") == pytest.approx(offset / between, rel=1e-6)
    assert val(df, "mag_offset", "10->40") > 0.4 and val(df, "mag_offset_spread", "10->40") > 0.4
    assert val(df, "mag_offset", "2.5->10") < 0.1  # only 40x moved
    df, _ = M.evaluate(t, X, magnifications=MAGS, n_bootstrap=20)
    assert val(df, "mag_offset", "10->40") < 0.1 and val(df, "mag_offset_spread", "10->40") < 0.1
    # without labels only the label-free twin has a value, and the other says why
    df, _ = M.evaluate(t.assign(label=None, label_purity=np.nan), shifted, magnifications=MAGS, n_bootstrap=20)
    assert np.isnan(val(df, "mag_offset", "10->40")) and val(df, "mag_offset_spread", "10->40") > 0.4
    assert df.loc[df.metric == "mag_offset", "note"].str.len().gt(0).all()


def test_magnification_only_embeddings_leak():
    # k = 3 classes = 3 magnifications.  Low noise: pooled tiles are 256:16:1 (40x:10x:2.5x),
    # and with a diffuse 40x cloud k-means prefers splitting it over isolating 2.5x.
    t, X = make_tiles(mode="mag", noise=0.1, n_classes=3)
    df, _ = M.evaluate(t, X, magnifications=MAGS, n_bootstrap=50)
    assert val(df, "mag_leakage", "global") > 0.9
    assert abs(val(df, "ami", "global")) < 0.1
    # no class information: probe near chance (1/3)
    assert val(df, "probe_ba", "10->10") < 0.6


def test_rcc_formula(noisy):
    _, _, df, _ = noisy
    assert M.retention_cc(0.7, 0.9, 4) == pytest.approx((0.7 - 0.25) / (0.9 - 0.25))
    assert M.retention(0.7, 0.9) == pytest.approx(0.7 / 0.9)
    C = 3
    for a in ("2.5", "10", "40"):
        for b in ("2.5", "10", "40"):
            if a == b:
                continue
            ab, aa = val(df, "probe_ba", f"{a}->{b}"), val(df, "probe_ba", f"{a}->{a}")
            assert val(df, "retention", f"{a}->{b}") == pytest.approx(ab / aa)
            assert val(df, "retention_cc", f"{a}->{b}") == pytest.approx((ab - 1 / C) / (aa - 1 / C))


def test_bootstrap_ci_contains_point(noisy):
    _, _, df, _ = noisy
    fin = df[df.ci_low.notna()]
    assert len(fin) >= 40
    assert (fin.ci_low <= fin.value + 1e-9).all(), fin[fin.ci_low > fin.value]
    assert (fin.value <= fin.ci_high + 1e-9).all(), fin[fin.value > fin.ci_high]
    # the noisy probe is not perfect, so intervals have width
    assert (df[df.metric == "probe_ba"].ci_high - df[df.metric == "probe_ba"].ci_low).max() > 0


def test_confusion_scores_match_sklearn():
    rng = np.random.default_rng(0)
    C = 4
    for _ in range(20):
        yt = rng.integers(0, C - 1, 60)  # class 3 never true
        yp = rng.integers(0, C, 60)
        conf = M._confusions(np.zeros(60, int), yt, yp, 1, C)[0]
        with np.errstate(all="ignore"):
            import warnings
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                assert M.balanced_accuracy_from_confusion(conf) == pytest.approx(
                    balanced_accuracy_score(yt, yp))
                assert M.macro_f1_from_confusion(conf) == pytest.approx(
                    f1_score(yt, yp, average="macro"))
                labs = np.union1d(yt, yp)
                assert M.miou_from_confusion(conf) == pytest.approx(
                    jaccard_score(yt, yp, average="macro", labels=labs))


def test_delta_hier_hand_computed():
    e1, e2, e3 = np.eye(3)
    h = (e1 + e2) / np.sqrt(2)
    Xa = np.stack([e1, e2])  # parent A, parent B (same slide)
    Xb = np.stack([e1, h, e2, e3])
    poc = np.array([0, 0, 1, 1])
    df = M.delta_hier(Xa, Xb, poc, np.array(["s", "s"]), np.random.default_rng(0))
    al_a, al_b = (1 + 1 / np.sqrt(2)) / 2, 0.5
    rd_a, rd_b = 0.0, (0 + 1 / np.sqrt(2)) / 2  # the only other parent, same child count
    assert df.sim_aligned.tolist() == pytest.approx([al_a, al_b])
    assert df.sim_random.tolist() == pytest.approx([rd_a, rd_b])
    assert df.delta.mean() == pytest.approx(((al_a - rd_a) + (al_b - rd_b)) / 2)


def test_delta_hier_other_parent_same_slide_only():
    # two slides: a random parent is never taken from the other slide, and a slide with a
    # single parent contributes nothing (no "other" parent)
    e1, e2 = np.eye(2)
    Xa = np.stack([e1, e2, e1])
    Xb = np.stack([e1, e1, e2, e2, e1])
    poc = np.array([0, 0, 1, 1, 2])
    for seed in range(5):
        df = M.delta_hier(Xa, Xb, poc, np.array(["s", "s", "t"]), np.random.default_rng(seed))
        assert df.parent.tolist() == [0, 1]
        assert df.sim_random.tolist() == pytest.approx([0.0, 0.0])
        assert df.delta.tolist() == pytest.approx([1.0, 1.0])


def test_delta_hier_in_evaluate_grandchildren():
    # one test slide, two parents: e_a(parent) = e_b(descendants) within a parent,
    # orthogonal between parents -> sim_aligned 1, sim_random 0, Δhier 1, for all pairs
    t, X = make_tiles(n_slides=2, parents_per_slide=2, n_classes=2, n_test=1, noise=0.0,
                      children=4, D=8)
    X = X.copy()
    for p, v in enumerate(np.eye(8)[:2]):
        X[(t.slide_id == "S00").to_numpy() & (t.i == 0).to_numpy() & (t.j == p).to_numpy()] = v
    df, art = M.evaluate(t, X, magnifications=MAGS, n_bootstrap=50)
    for p in ("2.5->10", "10->40", "2.5->40"):
        assert val(df, "sim_aligned", p) == pytest.approx(1.0, abs=1e-6)
    for p in ("2.5->10", "2.5->40"):
        assert val(df, "sim_random", p) == pytest.approx(0.0, abs=1e-6)
        assert val(df, "delta_hier", p) == pytest.approx(1.0, abs=1e-6)
    dh = art["delta_hier"]
    assert set(dh.pair) == {"2.5->10", "10->40", "2.5->40"}
    assert (dh[dh.pair == "2.5->40"].n_children == 16).all()  # 4 children x 4 grandchildren
    assert (dh.slide_id == "S00").all()  # Δhier uses test slides only


def test_label_free_path():
    t, X = make_tiles(labels=False, noise=0.5)
    df, art = M.evaluate(t, X, magnifications=MAGS, n_bootstrap=50, n_clusters=4)
    labelled = df.metric.isin(["probe_ba", "probe_f1", "retention", "retention_cc", "ami",
                               "seg_miou", "probe_ba_magcentred", "retention_cc_magcentred", "mag_offset"])
    assert df.loc[labelled, "value"].isna().all()
    assert (df.loc[labelled, "note"] == M.NO_LABELS).all()
    free = df[~labelled]
    assert set(free.metric) == {"dbi", "mag_leakage", "delta_hier", "sim_aligned",
                                "sim_random", "seg_consistency", "mag_offset_spread"}
    assert free.value.notna().all()
    assert (free.note == "").all()
    assert art["labelled"] is False
    pred = art["predictions"]
    assert pred.source.iloc[0] == "kmeans_10x" and pred.pred.notna().all()
    assert art["kmeans"].cluster.max() < 4
    # labels present but below the purity threshold are not labels either
    t2 = t.assign(label="x", label_purity=0.5)
    df2, _ = M.evaluate(t2, X, magnifications=MAGS, n_bootstrap=20)
    assert df2.loc[df2.metric == "probe_ba", "value"].isna().all()


def test_slide_split_never_leaks():
    ids = [f"slide{i}" for i in range(17)] * 3
    sp = M.slide_split(ids, frac=0.3, seed=5)
    assert sorted(sp) == sorted(set(ids))
    assert set(sp.values()) == {"train", "test"}
    assert sum(v == "test" for v in sp.values()) == 5
    assert M.slide_split(reversed(ids), frac=0.3, seed=5) == sp  # deterministic, order-free
    assert sum(v == "test" for v in M.slide_split(["a", "b"], n_test=5).values()) == 1
    # evaluate without a split column: slide-level split, recorded; no slide in both
    t, X = make_tiles(split=False, n_slides=6)
    df, art = M.evaluate(t, X, magnifications=MAGS, n_bootstrap=20)
    sp = art["split"]
    assert sorted(sp) == sorted(t.slide_id.unique())  # one split per slide
    assert set(sp.values()) == {"train", "test"}
    assert art["split_source"].startswith("slide_split")
    test_ids = {s for s, v in sp.items() if v == "test"}
    assert set(art["predictions"].slide_id) == test_ids
    assert set(art["delta_hier"].slide_id) <= test_ids
    assert sp == M.slide_split(t.slide_id, frac=0.3, seed=0)
    json.dumps({k: v for k, v in art.items() if not isinstance(v, pd.DataFrame)})
    # inconsistent split within a slide is refused
    t, X = make_tiles()
    t.loc[t.index[0], "split"] = "train"  # S00 is a test slide
    with pytest.raises(ValueError, match="both splits"):
        M.evaluate(t, X, magnifications=MAGS, n_bootstrap=10)


def test_probe_fits_on_train_slides_only():
    # train slides carry shuffled labels, test slides true ones: a probe fitted on train
    # slides only is at chance on the test slides; one that saw test slides would not be
    t, X = make_tiles(n_slides=8, n_test=3, noise=0.3)
    rng = np.random.default_rng(0)
    tr = (t.split == "train").to_numpy()
    t.loc[tr, "label"] = rng.permutation(t.loc[tr, "label"].to_numpy())
    df, _ = M.evaluate(t, X, magnifications=MAGS, n_bootstrap=20)
    assert val(df, "probe_ba", "40->40") < 0.6
    assert val(df, "ami", "global") > 0.9  # clustering uses test slides only


def test_tidy_schema(clean):
    _, _, df, _ = clean
    td = M.tidy(df, "mad", "vit_small")
    assert list(td.columns) == ["experiment", "encoder", "metric", "scope", "value", "ci_low",
                                "ci_high", "note"]
    assert (td.experiment == "mad").all() and (td.encoder == "vit_small").all()
    assert len(td) == len(df)
    td2 = M.tidy(df.drop(columns="note").assign(seed=1), "x", "y")
    assert list(td2.columns) == M.TIDY_COLUMNS + ["seed"]


def test_artifacts_shapes(clean):
    t, X, _, art = clean
    assert len(art["pca"]) == len(t)
    assert {"pc1", "pc2", "mag", "label", "slide_id"} <= set(art["pca"].columns)
    pred = art["predictions"]
    test_rows = (t.split == "test").sum()
    assert len(pred) == test_rows
    assert {"slide_id", "mag", "x0", "y0", "size0", "pred", "label"} <= set(pred.columns)
    assert pred.source.iloc[0] == "probe_10x"
    assert set(art["kmeans"].scope) == {"global", "2.5", "10", "40"}


def test_missing_magnification_and_probe_failure():
    # a slide lacking 40x and a magnification without labelled train tiles
    t, X = make_tiles(n_slides=6, n_test=2)
    keep = ~((t.slide_id == "S00") & (t.mag == 40.0)).to_numpy()
    t, X = t[keep].reset_index(drop=True), X[keep]
    tr40 = ((t.split == "train") & (t.mag == 40.0)).to_numpy()
    t.loc[tr40, "label"] = None
    df, _ = M.evaluate(t, X, magnifications=MAGS, n_bootstrap=20)
    r = df[(df.metric == "probe_ba") & (df.scope == "40->10")]
    assert r.value.isna().all() and r.note.str.contains("40x").all()
    assert np.isfinite(val(df, "probe_ba", "10->40"))
    assert np.isfinite(val(df, "seg_consistency", "10->40"))
