"""Evaluation metrics for magnification invariance of tile embeddings (docs/metrics.md).

Entry points
------------
``evaluate(tiles, X, magnifications=...) -> (metrics_df, artifacts)``
    All metrics of docs/metrics.md on one encoder's embeddings.  ``tiles`` has one row per embedded
    tile (``slide_id, mag, i, j, k, m, label, label_purity, split, x0, y0, size0``) and is
    row-aligned with ``X`` (N, D), L2-normalised.
``tidy(metrics_df, experiment, encoder)``
    The tidy table (``experiment, encoder, metric, scope, value, ci_low, ci_high, note``).
``slide_split(slide_ids, n_test=None, frac=0.3, seed=0)``
    Deterministic slide-level split (used when the manifest has no ``split``).

Metric names and scopes are exactly those of docs/metrics.md.  Confidence intervals are
95% percentile bootstrap intervals: over *test slides* for the probe, retention and
segmentation metrics (the fitted probe is fixed, slides are resampled with replacement,
and per-slide confusion matrices are summed, so no refitting happens per resample), and
over *parents* for Δhier.  Clustering metrics (AMI, DBI, leakage) are reported without a
CI (a k-means refit per resample would dominate the runtime).

When no tile carries a usable label the label-free metrics are still computed (Δhier, DBI,
magnification leakage, segmentation consistency on k-means cluster maps) and every
labelled metric is reported with ``value = NaN`` and a ``note`` giving the reason.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass, replace
from typing import Iterable, Sequence

import numpy as np
import pandas as pd
from sklearn.cluster import KMeans
from sklearn.decomposition import PCA
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import (adjusted_mutual_info_score, balanced_accuracy_score,
                             davies_bouldin_score)
from sklearn.model_selection import GroupKFold, StratifiedKFold
from sklearn.preprocessing import StandardScaler
from threadpoolctl import threadpool_limits

from madflow.hierarchy import ancestor_rows, key_arrays
from madflow.slides import mag_str, pair_str

__all__ = [
    "METRIC_COLUMNS", "TIDY_COLUMNS", "DEFAULT_CS", "mag_str", "pair_str", "slide_split",
    "evaluate", "tidy", "balanced_accuracy_from_confusion", "macro_f1_from_confusion",
    "miou_from_confusion", "retention", "retention_cc", "delta_hier", "bootstrap_ci",
]

METRIC_COLUMNS = ["metric", "scope", "value", "ci_low", "ci_high", "note"]
TIDY_COLUMNS = ["experiment", "encoder", "metric", "scope", "value", "ci_low", "ci_high", "note"]
DEFAULT_CS = tuple(np.logspace(-3, 2, 6))
NO_LABELS = "not applicable: no labels"


# ----------------------------------------------------------------------------- split
def slide_split(slide_ids: Iterable[str], n_test: int | None = None, frac: float = 0.3,
                seed: int = 0) -> dict[str, str]:
    """Deterministic slide-level split: ``{slide_id: "train" | "test"}``.

    ``n_test`` test slides (else ``round(frac * n)``, at least 1 and, with >= 2 slides, at
    most n - 1).  The result depends only on the *set* of ids and on ``seed``.  Every slide
    gets exactly one split, so no slide can be in both.
    """
    ids = sorted({str(s) for s in slide_ids})
    n = len(ids)
    if n == 0:
        return {}
    if n_test is None:
        n_test = int(round(frac * n))
    n_test = int(n_test)
    if n >= 2:
        n_test = min(max(n_test, 1), n - 1)
    else:
        n_test = min(max(n_test, 0), 1)
    perm = np.random.default_rng(seed).permutation(n)
    test = {ids[p] for p in perm[:n_test]}
    return {s: ("test" if s in test else "train") for s in ids}


# ----------------------------------------------------------------------------- confusion-based scores
def _confusions(group: np.ndarray, y_true: np.ndarray, y_pred: np.ndarray, n_groups: int,
                n_classes: int) -> np.ndarray:
    """Per-group confusion matrices (G, C, C), rows = true class, cols = predicted."""
    c2 = n_classes * n_classes
    flat = np.bincount(group.astype(np.int64) * c2 + y_true.astype(np.int64) * n_classes
                       + y_pred.astype(np.int64), minlength=n_groups * c2)
    return flat.reshape(n_groups, n_classes, n_classes).astype(np.float64)


def balanced_accuracy_from_confusion(conf: np.ndarray) -> np.ndarray:
    """Balanced accuracy over classes present in y_true (as sklearn); conf (..., C, C)."""
    rows = conf.sum(-1)
    diag = np.diagonal(conf, axis1=-2, axis2=-1)
    with np.errstate(invalid="ignore", divide="ignore"):
        rec = np.where(rows > 0, diag / rows, 0.0)
        n = (rows > 0).sum(-1)
        return np.where(n > 0, rec.sum(-1) / np.maximum(n, 1), np.nan)


def macro_f1_from_confusion(conf: np.ndarray) -> np.ndarray:
    """Macro-F1 over classes present in y_true or y_pred (as sklearn's ``f1_score``)."""
    tp = np.diagonal(conf, axis1=-2, axis2=-1)
    denom = conf.sum(-1) + conf.sum(-2)  # 2tp + fp + fn
    with np.errstate(invalid="ignore", divide="ignore"):
        f1 = np.where(denom > 0, 2 * tp / np.where(denom > 0, denom, 1), 0.0)
        n = (denom > 0).sum(-1)
        return np.where(n > 0, f1.sum(-1) / np.maximum(n, 1), np.nan)


def miou_from_confusion(conf: np.ndarray) -> np.ndarray:
    """Mean IoU over classes present in the ground truth or the prediction."""
    tp = np.diagonal(conf, axis1=-2, axis2=-1)
    union = conf.sum(-1) + conf.sum(-2) - tp
    with np.errstate(invalid="ignore", divide="ignore"):
        iou = np.where(union > 0, tp / np.where(union > 0, union, 1), 0.0)
        n = (union > 0).sum(-1)
        return np.where(n > 0, iou.sum(-1) / np.maximum(n, 1), np.nan)


def retention(ba_ab, ba_aa):
    """R(a->b) = BA(a->b) / BA(a->a)."""
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.asarray(ba_ab, float) / np.asarray(ba_aa, float)


def retention_cc(ba_ab, ba_aa, n_classes: int):
    """Rcc(a->b) = (BA(a->b) - 1/C) / (BA(a->a) - 1/C)."""
    chance = 1.0 / n_classes
    with np.errstate(invalid="ignore", divide="ignore"):
        return (np.asarray(ba_ab, float) - chance) / (np.asarray(ba_aa, float) - chance)


def bootstrap_ci(samples: np.ndarray, alpha: float = 0.05) -> tuple[float, float]:
    """Percentile CI of bootstrap samples (NaN-aware); (nan, nan) when none is finite."""
    s = np.asarray(samples, float)
    s = s[np.isfinite(s)]
    if s.size == 0:
        return (np.nan, np.nan)
    lo, hi = np.percentile(s, [100 * alpha / 2, 100 * (1 - alpha / 2)])
    return (float(lo), float(hi))


def _slide_weights(rng: np.random.Generator, n_slides: int, n_boot: int) -> np.ndarray:
    """(B, S) resampling counts: slides drawn with replacement, S draws per resample."""
    if n_slides == 0 or n_boot == 0:
        return np.zeros((n_boot, n_slides))
    idx = rng.integers(0, n_slides, size=(n_boot, n_slides))
    w = np.zeros((n_boot, n_slides))
    np.add.at(w, (np.repeat(np.arange(n_boot), n_slides), idx.ravel()), 1.0)
    return w


def _boot_conf(w: np.ndarray, conf: np.ndarray) -> np.ndarray:
    """Resampled confusions (B, C, C) from slide weights (B, S) and per-slide conf (S, C, C)."""
    s, c, _ = conf.shape
    return (w @ conf.reshape(s, c * c)).reshape(-1, c, c)


# ----------------------------------------------------------------------------- Δhier
def delta_hier(Xa: np.ndarray, Xb: np.ndarray, parent_of_child: np.ndarray,
               parent_slide: np.ndarray, rng: np.random.Generator) -> pd.DataFrame:
    """Per-parent Δhier.

    ``Xa`` (P, D) parent embeddings, ``Xb`` (Nc, D) descendant embeddings,
    ``parent_of_child`` (Nc,) index into Xa, ``parent_slide`` (P,) slide of each parent.
    Returns one row per parent with >= 1 descendant and >= 1 other such parent on its
    slide: ``parent, n_children, sim_aligned, sim_random, delta``.  ``sim_random`` uses
    the same number of descendants (without replacement; all of them when the other parent
    has fewer) of a uniformly drawn other parent of the same slide.
    """
    P = len(Xa)
    poc = np.asarray(parent_of_child, np.int64)
    cols = ["parent", "n_children", "sim_aligned", "sim_random", "delta"]
    if P == 0 or len(poc) == 0:
        return pd.DataFrame({c: [] for c in cols})
    n = np.bincount(poc, minlength=P)
    cos = np.einsum("ij,ij->i", Xb, Xa[poc], dtype=np.float64)
    aligned = np.bincount(poc, weights=cos, minlength=P) / np.maximum(n, 1)

    parents = np.flatnonzero(n > 0)
    slide_codes = pd.factorize(np.asarray(parent_slide)[parents])[0]
    order = np.lexsort((parents, slide_codes))
    parents, slide_codes = parents[order], slide_codes[order]
    sorted_par = parents.copy()
    gsize = np.bincount(slide_codes)
    gstart = np.concatenate([[0], np.cumsum(gsize)[:-1]])
    pos_in = np.arange(len(parents)) - gstart[slide_codes]
    g = gsize[slide_codes]
    ok = g >= 2  # a parent alone on its slide has no "other parent"
    parents, slide_codes, pos_in, g = parents[ok], slide_codes[ok], pos_in[ok], g[ok]
    if len(parents) == 0:
        return pd.DataFrame({c: [] for c in cols})
    r = np.minimum((rng.random(len(parents)) * (g - 1)).astype(np.int64), g - 2)
    r = np.where(r >= pos_in, r + 1, r)  # uniform over the slide's other parents
    other = sorted_par[gstart[slide_codes] + r]

    # children sorted by parent
    corder = np.argsort(poc, kind="stable")
    cstart = np.concatenate([[0], np.cumsum(n)[:-1]])
    n_other = n[other]
    tot = int(n_other.sum())
    grp = np.repeat(np.arange(len(parents)), n_other)
    eoff = np.concatenate([[0], np.cumsum(n_other)[:-1]])
    within = np.arange(tot) - np.repeat(eoff, n_other)
    cand = corder[np.repeat(cstart[other], n_other) + within]
    key = rng.random(tot)
    srt = np.lexsort((key, grp))  # grp already sorted, so group offsets are unchanged
    rank = np.arange(tot) - np.repeat(eoff, n_other)
    keep = rank < n[parents][grp[srt]]
    sel, sgrp = cand[srt][keep], grp[srt][keep]
    cos_r = np.einsum("ij,ij->i", Xb[sel], Xa[parents[sgrp]], dtype=np.float64)
    rand = np.bincount(sgrp, weights=cos_r, minlength=len(parents)) / np.maximum(
        np.bincount(sgrp, minlength=len(parents)), 1)
    al = aligned[parents]
    return pd.DataFrame({"parent": parents, "n_children": n[parents], "sim_aligned": al,
                         "sim_random": rand, "delta": al - rand})


def _bootstrap_means(values: np.ndarray, n_boot: int, rng: np.random.Generator,
                     chunk: int | None = None) -> np.ndarray:
    """Bootstrap means of each column of ``values`` (P, K) over rows: (B, K)."""
    v = np.asarray(values, float)
    if v.ndim == 1:
        v = v[:, None]
    P = len(v)
    out = np.full((n_boot, v.shape[1]), np.nan)
    if P == 0:
        return out
    chunk = chunk or int(max(1, min(100, 2_000_000 // (P * v.shape[1]))))
    for s in range(0, n_boot, chunk):
        b = min(chunk, n_boot - s)
        idx = rng.integers(0, P, size=(b, P))
        out[s:s + b] = v[idx].mean(1)
    return out


# ----------------------------------------------------------------------------- probe
class _Probe:
    def __init__(self, scaler, clf, classes_codes, C):
        self.scaler, self.clf, self.classes, self.C = scaler, clf, classes_codes, C

    def predict(self, X: np.ndarray) -> np.ndarray:
        if len(X) == 0:
            return np.zeros(0, np.int64)
        idx = self.clf.predict(self.scaler.transform(X))
        return np.asarray(idx, np.int64)  # classifier was fit on global class codes


def _cv_splits(y: np.ndarray, groups: np.ndarray, cv_folds: int, seed: int):
    n_groups = len(np.unique(groups))
    if n_groups >= max(cv_folds, 2):
        return list(GroupKFold(n_splits=cv_folds).split(y, y, groups)), "GroupKFold"
    counts = np.bincount(pd.factorize(y)[0])
    k = int(min(cv_folds, counts.min()))
    if k >= 2:
        skf = StratifiedKFold(n_splits=k, shuffle=True, random_state=seed)
        return list(skf.split(y, y)), "StratifiedKFold"
    return [], "none"


def _fit_probe(X: np.ndarray, y: np.ndarray, groups: np.ndarray, Cs: Sequence[float],
               cv_folds: int, seed: int, max_iter: int = 200,
               max_cv_tiles: int | None = 4000) -> _Probe | None:
    """StandardScaler + multinomial logistic regression; C by (group) k-fold CV (balanced
    accuracy) on at most ``max_cv_tiles`` training tiles (a seeded random subset: choosing
    C does not need every 40x tile), then refit on all training tiles."""
    if len(np.unique(y)) < 2:
        return None
    Cs = sorted(float(c) for c in Cs)
    Xf, yf = X, y
    if max_cv_tiles and len(y) > max_cv_tiles:
        sub = np.sort(np.random.default_rng(seed).choice(len(y), max_cv_tiles, replace=False))
        X, y, groups = X[sub], y[sub], groups[sub]
    splits, _ = _cv_splits(y, groups, cv_folds, seed)
    best_C = 1.0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        warnings.simplefilter("ignore", UserWarning)
        warnings.simplefilter("ignore", RuntimeWarning)
        if splits and len(Cs) > 1:
            scores = np.zeros((len(splits), len(Cs)))
            for f, (tr, va) in enumerate(splits):
                if len(np.unique(y[tr])) < 2:
                    scores[f] = np.nan
                    continue
                sc = StandardScaler().fit(X[tr])
                Xtr, Xva = sc.transform(X[tr]), sc.transform(X[va])
                clf = LogisticRegression(C=Cs[0], max_iter=max_iter, warm_start=True)
                for ci, C in enumerate(Cs):  # warm-started regularisation path
                    clf.set_params(C=C)
                    clf.fit(Xtr, y[tr])
                    scores[f, ci] = balanced_accuracy_score(y[va], clf.predict(Xva))
            mean = np.nanmean(scores, 0) if np.isfinite(scores).any() else None
            if mean is not None and np.isfinite(mean).any():
                best_C = Cs[int(np.nanargmax(mean))]
        elif len(Cs) == 1:
            best_C = Cs[0]
        sc = StandardScaler().fit(Xf)
        clf = LogisticRegression(C=best_C, max_iter=max_iter).fit(sc.transform(Xf), yf)
    return _Probe(sc, clf, np.unique(yf), best_C)


# ----------------------------------------------------------------------------- clustering
def _kmeans(X: np.ndarray, k: int, seed: int) -> tuple[np.ndarray, KMeans | None]:
    k = int(min(k, len(X)))
    if k < 1:
        return np.zeros(len(X), np.int64), None
    km = KMeans(n_clusters=k, n_init=10, random_state=seed).fit(X)
    return km.labels_.astype(np.int64), km


def _dbi(X: np.ndarray, lab: np.ndarray) -> float:
    n_lab = len(np.unique(lab))
    if n_lab < 2 or n_lab >= len(X):
        return np.nan
    return float(davies_bouldin_score(X, lab))


# ----------------------------------------------------------------------------- evaluate
def _row(metric, scope, value=np.nan, lo=np.nan, hi=np.nan, note=""):
    return {"metric": metric, "scope": scope, "value": float(value), "ci_low": float(lo),
            "ci_high": float(hi), "note": note}


def evaluate(tiles: pd.DataFrame, X: np.ndarray, *, magnifications: Sequence[float],
             min_purity: float = 0.8, n_bootstrap: int = 1000, cv_folds: int = 5,
             seed: int = 0, n_clusters: int | None = None, Cs: Sequence[float] = DEFAULT_CS,
             split_frac: float = 0.3, pca: bool = True,
             threads: int | None = 1) -> tuple[pd.DataFrame, dict]:
    """Compute every metric of docs/metrics.md.  See the module docstring.

    ``n_clusters``: k of the label-free k-means (default 8; with labels k = #classes).
    ``Cs``: the probe's C grid.  ``split_frac``/``seed``: the slide split used when
    ``tiles`` has no ``split``.  ``threads``: BLAS/OpenMP threads during evaluation (None =
    library defaults).  The matrices are small, and on a shared node spinning BLAS/OpenMP
    threads make the probe fits up to 100x slower, so the default is 1; a rule may pass
    its ``threads``.

    Returns ``(metrics_df, artifacts)``: ``metrics_df`` columns are
    ``metric, scope, value, ci_low, ci_high, note``; ``artifacts`` holds
    ``predictions`` (per test tile: the 10x probe's class, or the 10x k-means cluster when
    label-free, for segmentation maps), ``pca`` (2-D PCA per tile), ``delta_hier``
    (per-parent values), ``kmeans`` (assignments per clustering scope: ``row`` indexes
    ``tiles``), ``split`` ({slide_id: "train"|"test"}) and ``split_source`` ("tiles" or the
    ``slide_split`` call that made it), ``classes``, ``probe_C`` ({mag: chosen C}),
    ``labelled`` (bool) and ``magnifications``.  All but the DataFrames are JSON-ready.
    """
    if threads:
        with threadpool_limits(limits=int(threads)):
            return _evaluate(tiles, X, magnifications, min_purity, n_bootstrap, cv_folds,
                             seed, n_clusters, Cs, split_frac, pca)
    return _evaluate(tiles, X, magnifications, min_purity, n_bootstrap, cv_folds, seed,
                     n_clusters, Cs, split_frac, pca)


@dataclass
class _Data:
    """What every metric family reads: the tiles, their embeddings, split, labels and the
    shared bootstrap weights over test slides."""

    tiles: pd.DataFrame
    X: np.ndarray
    mags: list
    level: np.ndarray          # index into mags per tile, -1 = not an evaluated magnification
    slide: np.ndarray
    split: np.ndarray
    split_map: dict
    split_source: str
    is_test: np.ndarray
    is_train: np.ndarray
    test_code: np.ndarray      # index among the test slides, -1 for train tiles
    n_test_slides: int
    labels: pd.Series
    labelled: np.ndarray
    y: np.ndarray
    classes: list
    label_mode: bool
    why_no_labels: str
    keys: dict
    seed: int
    rng: np.random.Generator
    boot_w: np.ndarray = None

    @property
    def n_classes(self) -> int:
        return len(self.classes)


def _resolve_split(tiles: pd.DataFrame, slide: np.ndarray, seed: int, split_frac: float):
    """-> (split per tile, {slide: split}, source): the tiles' own split, else a seeded one."""
    source = "tiles"
    split = tiles["split"] if "split" in tiles.columns else pd.Series([None] * len(tiles))
    split = split.where(split.notna(), None).astype(object)
    per_slide = pd.DataFrame({"slide_id": slide, "split": split.to_numpy()})
    n_splits = per_slide.dropna().groupby("slide_id")["split"].nunique()
    if (n_splits > 1).any():
        raise ValueError(f"slides in both splits: {sorted(n_splits[n_splits > 1].index)}")
    if per_slide["split"].isna().any():
        auto = slide_split(np.unique(slide), frac=split_frac, seed=seed)
        missing = per_slide["split"].isna().to_numpy()
        split = split.copy()
        split[missing] = np.array([auto[s] for s in slide[missing]], dtype=object)
        source = "slide_split(seed=%d, frac=%g)" % (seed, split_frac)
    split = split.to_numpy().astype(str)
    return split, dict(sorted(zip(slide.tolist(), split.tolist()))), source


def _prepare(tiles, X, magnifications, min_purity, seed, split_frac) -> _Data:
    tiles = tiles.reset_index(drop=True)
    X = np.asarray(X)
    if len(tiles) != len(X):
        raise ValueError(f"tiles has {len(tiles)} rows but X has {len(X)}")
    mags = sorted(float(m) for m in magnifications)
    if not mags:
        raise ValueError("no magnifications")
    mag = tiles["mag"].to_numpy(float)
    level = np.full(len(tiles), -1, np.int64)
    for li, m in enumerate(mags):
        level[np.isclose(mag, m)] = li
    slide = tiles["slide_id"].astype(str).to_numpy()
    rng = np.random.default_rng(seed)
    split, split_map, split_source = _resolve_split(tiles, slide, seed, split_frac)
    is_test = split == "test"
    test_slides = np.unique(slide[is_test])
    code = {s: i for i, s in enumerate(test_slides)}
    if "label" in tiles.columns:
        labels = tiles["label"]
        has_label = labels.notna().to_numpy() & (labels.astype(str).str.len() > 0).to_numpy()
    else:
        labels = pd.Series([None] * len(tiles))
        has_label = np.zeros(len(tiles), bool)
    purity = (pd.to_numeric(tiles["label_purity"], errors="coerce").to_numpy(float)
              if "label_purity" in tiles.columns else np.full(len(tiles), np.nan))
    labelled = has_label & (purity >= min_purity)
    classes = sorted(labels[labelled].astype(str).unique().tolist())
    class_index = {c: i for i, c in enumerate(classes)}
    y = np.full(len(tiles), -1, np.int64)
    y[labelled] = [class_index[str(v)] for v in labels[labelled]]
    label_mode = len(classes) >= 2 and bool((labelled & is_test).any())
    if len(classes) >= 2 and not label_mode:
        why = "not applicable: no labelled test tiles"
    elif len(classes) == 1:
        why = "not applicable: only one labelled class"
    else:
        why = NO_LABELS
    return _Data(tiles, X, mags, level, slide, split, split_map, split_source, is_test, split == "train",
                 np.array([code.get(s, -1) for s in slide], np.int64), len(test_slides), labels, labelled,
                 y, classes, label_mode, why, key_arrays(tiles), seed, rng)


def _probe_metrics(d: _Data, Cs, cv_folds: int, chosen_C: dict | None = None) -> tuple[list, dict, dict]:
    """Probe transfer matrix BA/F1 (all pairs) and retention R/Rcc; -> rows, probes, notes.
    ``chosen_C``: per magnification, a C to refit with instead of choosing one by CV."""
    mags, C = d.mags, d.n_classes
    if not d.label_mode:
        rows = []
        for name in ("probe_ba", "probe_f1", "retention", "retention_cc"):
            rows += [_row(name, pair_str(a, b), note=d.why_no_labels) for a in mags for b in mags]
        return rows, {}, {}
    probes: dict[float, _Probe | None] = {}
    notes: dict = {}
    for ai, a in enumerate(mags):
        train = d.labelled & d.is_train & (d.level == ai)
        if len(np.unique(d.y[train])) < 2:
            probes[a] = None
            notes[a] = f"not applicable: fewer than 2 labelled classes in train tiles at {mag_str(a)}x"
            continue
        Cs_a = [chosen_C[a]] if chosen_C and chosen_C.get(a) is not None else Cs
        probes[a] = _fit_probe(d.X[train], d.y[train], d.slide[train], Cs_a, cv_folds, d.seed)
    ba_point, ba_boot, ba_rows, f1_rows = {}, {}, [], []
    for a in mags:
        for bi, b in enumerate(mags):
            scope = pair_str(a, b)
            test = d.labelled & d.is_test & (d.level == bi)
            note = notes.get(a) or ("" if test.any() else f"not applicable: no labelled test tiles at {mag_str(b)}x")
            if note:
                ba_rows.append(_row("probe_ba", scope, note=note))
                f1_rows.append(_row("probe_f1", scope, note=note))
                continue
            conf = _confusions(d.test_code[test], d.y[test], probes[a].predict(d.X[test]), d.n_test_slides, C)
            total, boot = conf.sum(0), _boot_conf(d.boot_w, conf)
            ba, ba_b = balanced_accuracy_from_confusion(total), balanced_accuracy_from_confusion(boot)
            ba_point[(a, b)], ba_boot[(a, b)] = float(ba), ba_b
            ba_rows.append(_row("probe_ba", scope, ba, *bootstrap_ci(ba_b)))
            f1_rows.append(_row("probe_f1", scope, macro_f1_from_confusion(total),
                                *bootstrap_ci(macro_f1_from_confusion(boot))))
    return ba_rows + f1_rows + _retention_rows(mags, C, ba_point, ba_boot, notes), probes, notes


def _offset_free_probe_metrics(d: _Data, probes: dict, Cs, cv_folds: int) -> list:
    """Diagnostic: the same probes (each magnification's C as chosen for ``probes``) on
    embeddings centred per magnification (each magnification's mean over all its tiles, test
    slides' included, subtracted). A transfer that appears only here is class structure shared
    across scales behind a constant per-magnification offset, which a probe fitted at one
    magnification cannot cross."""
    X = d.X.astype(np.float64, copy=True)
    for li in range(len(d.mags)):
        X[d.level == li] -= X[d.level == li].mean(0)
    chosen_C = {a: p.C for a, p in probes.items() if p is not None}
    rows, _, _ = _probe_metrics(replace(d, X=X), Cs, cv_folds, chosen_C)
    cross = {pair_str(a, b) for a in d.mags for b in d.mags if a != b}
    return [{**row, "metric": f"{row['metric']}_magcentred"} for row in rows
            if row["metric"] in ("probe_ba", "retention_cc") and row["scope"] in cross]


def _offset_metrics(d: _Data) -> list:
    """The per-magnification offset, for each pair a->b (a < b), on the test slides' tissue
    tiles: |mean e_b - mean e_a| over the mean distance between the class means at a
    (`mag_offset`: pure labelled tiles; needs labels) and over the mean distance of a tile to
    its magnification's mean, averaged over a and b (`mag_offset_spread`: label-free). Below 1
    the offset is smaller than what separates classes; a constant offset of that size is what
    a probe fitted at one magnification cannot cross."""
    rows = []
    for a, b in ((i, j) for i in range(len(d.mags)) for j in range(i + 1, len(d.mags))):
        scope = pair_str(d.mags[a], d.mags[b])
        at_a, at_b = d.is_test & (d.level == a), d.is_test & (d.level == b)
        if at_a.sum() < 2 or at_b.sum() < 2:
            why = "undefined: fewer than 2 test tiles at one magnification"
            rows += [_row("mag_offset", scope, note=why), _row("mag_offset_spread", scope, note=why)]
            continue
        mean_a, mean_b = d.X[at_a].mean(0), d.X[at_b].mean(0)
        offset = float(np.linalg.norm(mean_b - mean_a))
        spread = 0.5 * (np.linalg.norm(d.X[at_a] - mean_a, axis=1).mean()
                        + np.linalg.norm(d.X[at_b] - mean_b, axis=1).mean())
        rows.append(_row("mag_offset_spread", scope, offset / spread if spread > 0 else np.nan))
        if not d.label_mode:
            rows.append(_row("mag_offset", scope, note=d.why_no_labels))
            continue
        pure = at_a & d.labelled
        means = np.array([d.X[pure & (d.y == c)].mean(0) for c in range(d.n_classes) if (pure & (d.y == c)).any()])
        if len(means) < 2:
            rows.append(_row("mag_offset", scope, note=f"undefined: fewer than 2 classes at {mag_str(d.mags[a])}x"))
            continue
        between = np.linalg.norm(means[:, None] - means[None], axis=-1)[np.triu_indices(len(means), 1)].mean()
        rows.append(_row("mag_offset", scope, offset / between))
    return rows


def _retention_rows(mags, C: int, ba_point: dict, ba_boot: dict, notes: dict) -> list:
    r_rows, rcc_rows = [], []
    for a in mags:
        for b in mags:  # all 9 pairs like the probe; R(a->a) = 1 by construction
            scope = pair_str(a, b)
            if (a, b) not in ba_point or (a, a) not in ba_point:
                note = notes.get(a, "not applicable: BA(a->a) or BA(a->b) missing")
                r_rows.append(_row("retention", scope, note=note))
                rcc_rows.append(_row("retention_cc", scope, note=note))
                continue
            r = retention(ba_point[(a, b)], ba_point[(a, a)])
            rc = retention_cc(ba_point[(a, b)], ba_point[(a, a)], C)
            n_r = "" if np.isfinite(r) else f"undefined: BA({mag_str(a)}->{mag_str(a)}) = 0"
            n_rc = "" if np.isfinite(rc) else f"undefined: BA({mag_str(a)}->{mag_str(a)}) = chance (1/{C})"
            r_rows.append(_row("retention", scope, r if np.isfinite(r) else np.nan,
                               *bootstrap_ci(retention(ba_boot[(a, b)], ba_boot[(a, a)])), note=n_r))
            rcc_rows.append(_row("retention_cc", scope, rc if np.isfinite(rc) else np.nan,
                                 *bootstrap_ci(retention_cc(ba_boot[(a, b)], ba_boot[(a, a)], C)), note=n_rc))
    return r_rows + rcc_rows


def _clustering_metrics(d: _Data, k: int) -> tuple[list, pd.DataFrame]:
    """k-means AMI and DBI (global and per magnification) and magnification leakage."""
    base = (d.labelled & d.is_test & (d.level >= 0)) if d.label_mode else (d.is_test & (d.level >= 0))
    idx_global = np.flatnonzero(base)
    records, ami_rows, dbi_rows = [], [], []

    def cluster(idx, scope, too_few):
        if len(idx) < 2:
            ami_rows.append(_row("ami", scope, note=too_few if d.label_mode else d.why_no_labels))
            dbi_rows.append(_row("dbi", scope, note=too_few))
            return None
        clusters, _ = _kmeans(d.X[idx], k, d.seed)
        records.append(pd.DataFrame({"row": idx, "scope": scope, "cluster": clusters}))
        if d.label_mode:
            ami_rows.append(_row("ami", scope, adjusted_mutual_info_score(d.y[idx], clusters)))
        else:
            ami_rows.append(_row("ami", scope, note=d.why_no_labels))
        dbi_rows.append(_row("dbi", scope, _dbi(d.X[idx], clusters)))
        return clusters

    too_few = "not applicable: fewer than 2 test tiles"
    clusters = cluster(idx_global, "global", too_few)
    leak_row = (_row("mag_leakage", "global", note=too_few) if clusters is None else
                _row("mag_leakage", "global", adjusted_mutual_info_score(d.level[idx_global], clusters)))
    for mi, m in enumerate(d.mags):
        cluster(idx_global[d.level[idx_global] == mi], mag_str(m),
                f"not applicable: fewer than 2 test tiles at {mag_str(m)}x")
    kmeans = (pd.concat(records, ignore_index=True) if records else
              pd.DataFrame({"row": [], "scope": [], "cluster": []}))
    return ami_rows + dbi_rows + [leak_row], kmeans


DELTA_HIER_COLUMNS = ["pair", "slide_id", "row", "i", "j", "n_children", "sim_aligned", "sim_random", "delta"]


def _hier_pairs(mags) -> list[tuple[int, int]]:
    return [(0, 1), (1, 2), (0, 2)] if len(mags) >= 3 else ([(0, 1)] if len(mags) == 2 else [])


def _delta_hier_metrics(d: _Data, n_bootstrap: int) -> tuple[list, pd.DataFrame]:
    """Δhier, sim_aligned, sim_random per pair (bootstrap over parents) and per-parent values."""
    names = ["delta_hier", "sim_aligned", "sim_random"]
    rows = {name: [] for name in names}
    frames = []
    for ai, bi in _hier_pairs(d.mags):
        scope = pair_str(d.mags[ai], d.mags[bi])
        rows_a = np.flatnonzero(d.is_test & (d.level == ai))
        rows_b = np.flatnonzero(d.is_test & (d.level == bi))
        ancestor = ancestor_rows(d.slide, d.keys, rows_a, ai, rows_b)
        found = ancestor >= 0
        rows_b, ancestor = rows_b[found], ancestor[found]
        parent_rows, parent_of_child = np.unique(ancestor, return_inverse=True)
        per_parent = delta_hier(d.X[parent_rows], d.X[rows_b], parent_of_child, d.slide[parent_rows], d.rng)
        if len(per_parent) == 0:
            note = "not applicable: no parents with tissue descendants and another parent on the slide"
            for name in names:
                rows[name].append(_row(name, scope, note=note))
            continue
        values = per_parent[["delta", "sim_aligned", "sim_random"]].to_numpy()
        boots = _bootstrap_means(values, n_bootstrap, d.rng)
        for ci, name in enumerate(names):
            rows[name].append(_row(name, scope, values[:, ci].mean(), *bootstrap_ci(boots[:, ci])))
        prow = parent_rows[per_parent["parent"].to_numpy()]
        frames.append(pd.DataFrame({
            "pair": scope, "slide_id": d.slide[prow], "row": prow, "i": d.keys["i"][prow], "j": d.keys["j"][prow],
            "n_children": per_parent["n_children"].to_numpy(), "sim_aligned": per_parent["sim_aligned"].to_numpy(),
            "sim_random": per_parent["sim_random"].to_numpy(), "delta": per_parent["delta"].to_numpy()}))
    frame = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=DELTA_HIER_COLUMNS)
    return [r for name in names for r in rows[name]], frame


def _segmentation_maps(d: _Data, probes: dict, notes: dict, k: int) -> tuple[np.ndarray, np.ndarray, str | None, str]:
    """A class per test tile at every magnification from the probe at 10x (the middle
    magnification), or from k-means at 10x without labels; -> (rows, predictions, source, note)."""
    mid_i = next((i for i, m in enumerate(d.mags) if np.isclose(m, 10.0)), len(d.mags) // 2)
    mid = d.mags[mid_i]
    seg_rows = np.flatnonzero(d.is_test & (d.level >= 0))
    pred = np.full(len(d.tiles), -1, np.int64)
    if d.label_mode and probes.get(mid) is not None:
        pred[seg_rows] = probes[mid].predict(d.X[seg_rows])
        return seg_rows, pred, f"probe_{mag_str(mid)}x", ""
    if d.label_mode:
        return seg_rows, pred, None, notes.get(mid, f"not applicable: no probe at {mag_str(mid)}x")
    fit_rows = seg_rows[d.level[seg_rows] == mid_i]
    if len(fit_rows) < 2:
        return seg_rows, pred, None, f"not applicable: fewer than 2 test tiles at {mag_str(mid)}x"
    _, km = _kmeans(d.X[fit_rows], k, d.seed)
    pred[seg_rows] = km.predict(d.X[seg_rows])
    return seg_rows, pred, f"kmeans_{mag_str(mid)}x", ""


def _segmentation_metrics(d: _Data, probes: dict, notes: dict, k: int) -> tuple[list, pd.DataFrame]:
    """Consistency of each tile's class with its ancestor's, and mIoU against ground truth."""
    seg_rows, pred, source, note = _segmentation_maps(d, probes, notes, k)
    rows, S = [], d.n_test_slides
    for ai in range(len(d.mags)):
        for bi in range(ai + 1, len(d.mags)):
            scope = pair_str(d.mags[ai], d.mags[bi])
            if source is None:
                rows.append(_row("seg_consistency", scope, note=note))
                continue
            rows_a = seg_rows[d.level[seg_rows] == ai]
            rows_b = seg_rows[d.level[seg_rows] == bi]
            ancestor = ancestor_rows(d.slide, d.keys, rows_a, ai, rows_b)
            found = ancestor >= 0
            if not found.any():
                rows.append(_row("seg_consistency", scope, note="not applicable: no tiles with an embedded ancestor"))
                continue
            agree = (pred[rows_b[found]] == pred[ancestor[found]]).astype(float)
            group = d.test_code[rows_b[found]]
            num = np.bincount(group, weights=agree, minlength=S)
            den = np.bincount(group, minlength=S).astype(float)
            with np.errstate(invalid="ignore", divide="ignore"):
                boot = (d.boot_w @ num) / (d.boot_w @ den)
            rows.append(_row("seg_consistency", scope, num.sum() / den.sum(), *bootstrap_ci(boot)))
    for mi, m in enumerate(d.mags):
        scope = mag_str(m)
        test = d.labelled & d.is_test & (d.level == mi)
        why = (d.why_no_labels if not d.label_mode else note if source is None else
               "" if test.any() else f"not applicable: no labelled test tiles at {scope}x")
        if why:
            rows.append(_row("seg_miou", scope, note=why))
            continue
        conf = _confusions(d.test_code[test], d.y[test], pred[test], S, d.n_classes)
        rows.append(_row("seg_miou", scope, miou_from_confusion(conf.sum(0)),
                         *bootstrap_ci(miou_from_confusion(_boot_conf(d.boot_w, conf)))))
    return rows, _predictions_frame(d, seg_rows, pred, source)


def _predictions_frame(d: _Data, seg_rows: np.ndarray, pred: np.ndarray, source: str | None) -> pd.DataFrame:
    columns = [c for c in ("slide_id", "mag", "i", "j", "k", "m", "x0", "y0", "size0") if c in d.tiles.columns]
    frame = d.tiles.loc[seg_rows, columns].copy()
    frame.insert(0, "row", seg_rows)
    frame["label"] = np.where(d.labelled[seg_rows], d.labels.to_numpy(object)[seg_rows], None)
    if source is None:
        frame["pred"] = None
    elif source.startswith("probe"):
        frame["pred"] = np.array(d.classes, dtype=object)[pred[seg_rows]]
    else:
        frame["pred"] = [f"cluster {c}" for c in pred[seg_rows]]
    frame["source"] = source
    return frame.reset_index(drop=True)


def _pca_frame(d: _Data) -> pd.DataFrame:
    Z = PCA(n_components=2, random_state=d.seed).fit_transform(np.asarray(d.X, np.float64))
    return pd.DataFrame({"row": np.arange(len(d.tiles)), "slide_id": d.slide, "mag": d.tiles["mag"].to_numpy(float),
                         "split": d.split, "label": np.where(d.labelled, d.labels.to_numpy(object), None),
                         "pc1": Z[:, 0], "pc2": Z[:, 1]})


def _explain_missing(metrics_df: pd.DataFrame) -> pd.DataFrame:
    """Every missing value says why."""
    bad = metrics_df["value"].isna() & (metrics_df["note"] == "")
    dbi = bad & (metrics_df["metric"] == "dbi")
    metrics_df.loc[dbi, "note"] = "undefined: Davies-Bouldin needs >= 2 clusters and more tiles than clusters"
    metrics_df.loc[bad & ~dbi, "note"] = "undefined: degenerate input"
    return metrics_df


def _evaluate(tiles, X, magnifications, min_purity, n_bootstrap, cv_folds, seed, n_clusters,
              Cs, split_frac, pca):
    d = _prepare(tiles, X, magnifications, min_purity, seed, split_frac)
    d.boot_w = _slide_weights(d.rng, d.n_test_slides, n_bootstrap)  # shared by slide-level metrics
    k = d.n_classes if d.label_mode else (int(n_clusters) if n_clusters else 8)
    artifacts: dict = {"split": d.split_map, "split_source": d.split_source, "classes": d.classes,
                       "labelled": bool(d.label_mode), "magnifications": d.mags}
    probe_rows, probes, notes = _probe_metrics(d, Cs, cv_folds)
    if d.label_mode:
        artifacts["probe_C"] = {mag_str(a): (p.C if p is not None else None) for a, p in probes.items()}
    cluster_rows, artifacts["kmeans"] = _clustering_metrics(d, k)
    hier_rows, artifacts["delta_hier"] = _delta_hier_metrics(d, n_bootstrap)
    seg_rows, artifacts["predictions"] = _segmentation_metrics(d, probes, notes, k)
    if pca and len(d.X) >= 2 and d.X.shape[1] >= 2:
        artifacts["pca"] = _pca_frame(d)
    rows = (probe_rows + _offset_free_probe_metrics(d, probes, Cs, cv_folds) + _offset_metrics(d) + cluster_rows
            + hier_rows + seg_rows)
    return _explain_missing(pd.DataFrame(rows, columns=METRIC_COLUMNS)), artifacts


def tidy(metrics_df: pd.DataFrame, experiment: str, encoder: str) -> pd.DataFrame:
    """Tidy table in the tidy column order (+ ``note``; extra columns such as ``seed`` kept last)."""
    df = metrics_df.copy()
    df.insert(0, "encoder", encoder)
    df.insert(0, "experiment", experiment)
    if "note" not in df.columns:
        df["note"] = ""
    df["note"] = df["note"].fillna("")
    extra = [c for c in df.columns if c not in TIDY_COLUMNS]
    return df[TIDY_COLUMNS + extra].reset_index(drop=True)
