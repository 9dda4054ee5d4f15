"""Evaluation metrics for magnification invariance of tile embeddings (SPEC section 8).

Entry points
------------
``evaluate(tiles, X, magnifications=...) -> (metrics_df, artifacts)``
    All SPEC-8 metrics on one encoder's embeddings.  ``tiles`` has one row per embedded
    tile (``slide_id, mag, i, j, k, m, label, label_purity, split, x0, y0, size0``) and is
    row-aligned with ``X`` (N, D), L2-normalised.
``tidy(metrics_df, experiment, encoder)``
    The tidy table (``experiment, encoder, metric, scope, value, ci_low, ci_high, note``).
``slide_split(slide_ids, n_test=None, frac=0.3, seed=0)``
    Deterministic slide-level split (used when the manifest has no ``split``).

Metric names and scopes are exactly those of SPEC section 8.  Confidence intervals are
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
_KEY_COLS = ("i", "j", "k", "m")


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


# ----------------------------------------------------------------------------- hierarchy
def _key_arrays(tiles: pd.DataFrame) -> dict[str, np.ndarray]:
    out = {}
    for c in _KEY_COLS:
        if c in tiles.columns:
            out[c] = pd.to_numeric(tiles[c], errors="coerce").fillna(-1).to_numpy(np.int64)
        else:
            out[c] = np.full(len(tiles), -1, np.int64)
    return out


def _ancestor_index(slide: np.ndarray, keys: dict[str, np.ndarray], rows_a: np.ndarray,
                    level_a: int, rows_b: np.ndarray) -> np.ndarray:
    """For each row in ``rows_b`` (finer), the row (in the full table) of its ancestor among
    ``rows_a`` (at hierarchy level ``level_a``: 0 -> (i, j), 1 -> (i, j, k), ...), or -1."""
    cols = list(_KEY_COLS[: 2 + level_a])
    if len(rows_a) == 0 or len(rows_b) == 0:
        return np.full(len(rows_b), -1, np.int64)
    mi_a = pd.MultiIndex.from_arrays([slide[rows_a]] + [keys[c][rows_a] for c in cols])
    dup = mi_a.duplicated()
    if dup.any():  # defensive: keep the first of duplicated tiles
        mi_a, rows_a = mi_a[~dup], rows_a[~dup]
    mi_b = pd.MultiIndex.from_arrays([slide[rows_b]] + [keys[c][rows_b] for c in cols])
    pos = mi_a.get_indexer(mi_b)
    return np.where(pos >= 0, rows_a[np.maximum(pos, 0)], -1)


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
    """Compute every SPEC-8 metric.  See the module docstring.

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


def _evaluate(tiles, X, magnifications, min_purity, n_bootstrap, cv_folds, seed, n_clusters,
              Cs, split_frac, pca):
    t0 = tiles.reset_index(drop=True)
    X = np.asarray(X)
    if len(t0) != len(X):
        raise ValueError(f"tiles has {len(t0)} rows but X has {len(X)}")
    mags = sorted(float(m) for m in magnifications)
    if not mags:
        raise ValueError("no magnifications")
    mag = t0["mag"].to_numpy(float)
    lev = np.full(len(t0), -1, np.int64)
    for li, m in enumerate(mags):
        lev[np.isclose(mag, m)] = li
    slide = t0["slide_id"].astype(str).to_numpy()
    rng = np.random.default_rng(seed)

    # -- split ------------------------------------------------------------------------
    split_source = "tiles"
    split = t0["split"] if "split" in t0.columns else pd.Series([None] * len(t0))
    split = split.where(split.notna(), None).astype(object)
    per_slide = pd.DataFrame({"slide_id": slide, "split": split.to_numpy()})
    nun = per_slide.dropna().groupby("slide_id")["split"].nunique()
    if (nun > 1).any():
        raise ValueError(f"slides in both splits: {sorted(nun[nun > 1].index)}")
    if per_slide["split"].isna().any():
        auto = slide_split(np.unique(slide), frac=split_frac, seed=seed)
        missing = per_slide["split"].isna().to_numpy()
        fill = np.array([auto[s] for s in slide[missing]], dtype=object)
        split = split.copy()
        split[missing] = fill
        split_source = "slide_split(seed=%d, frac=%g)" % (seed, split_frac)
    split = split.to_numpy().astype(str)
    is_test = split == "test"
    is_train = split == "train"
    split_map = dict(sorted(zip(slide.tolist(), split.tolist())))
    test_slides = np.unique(slide[is_test])
    slide_code = {s: i for i, s in enumerate(test_slides)}
    S = len(test_slides)
    tcode = np.array([slide_code.get(s, -1) for s in slide], np.int64)

    # -- labels -----------------------------------------------------------------------
    if "label" in t0.columns:
        lab_raw = t0["label"]
        has_label = lab_raw.notna().to_numpy() & (lab_raw.astype(str).str.len() > 0).to_numpy()
    else:
        lab_raw = pd.Series([None] * len(t0))
        has_label = np.zeros(len(t0), bool)
    purity = (pd.to_numeric(t0["label_purity"], errors="coerce").to_numpy(float)
              if "label_purity" in t0.columns else np.full(len(t0), np.nan))
    labelled = has_label & (purity >= min_purity)
    classes = sorted(lab_raw[labelled].astype(str).unique().tolist())
    cls_index = {c: i for i, c in enumerate(classes)}
    y = np.full(len(t0), -1, np.int64)
    y[labelled] = [cls_index[str(v)] for v in lab_raw[labelled]]
    C = len(classes)
    label_mode = C >= 2 and (labelled & is_test).any()
    if C >= 2 and not label_mode:
        why_nolab = "not applicable: no labelled test tiles"
    elif C == 1:
        why_nolab = "not applicable: only one labelled class"
    else:
        why_nolab = NO_LABELS

    boot_w = _slide_weights(rng, S, n_bootstrap)  # shared across slide-level metrics
    rows: list[dict] = []
    keys = _key_arrays(t0)
    artifacts: dict = {"split": split_map, "split_source": split_source, "classes": classes,
                       "labelled": bool(label_mode), "magnifications": mags}

    # -- probe transfer matrix --------------------------------------------------------
    probes: dict[float, _Probe | None] = {}
    ba_point, ba_boot = {}, {}
    f1_rows, ba_rows, notes = [], [], {}
    if label_mode:
        for ai, a in enumerate(mags):
            tr = labelled & is_train & (lev == ai)
            if len(np.unique(y[tr])) < 2:
                probes[a] = None
                notes[a] = f"not applicable: fewer than 2 labelled classes in train tiles at {mag_str(a)}x"
                continue
            probes[a] = _fit_probe(X[tr], y[tr], slide[tr], Cs, cv_folds, seed)
        artifacts["probe_C"] = {mag_str(a): (p.C if p is not None else None)
                                for a, p in probes.items()}
        for a in mags:
            for bi, b in enumerate(mags):
                sc = pair_str(a, b)
                te = labelled & is_test & (lev == bi)
                if probes[a] is None:
                    ba_rows.append(_row("probe_ba", sc, note=notes[a]))
                    f1_rows.append(_row("probe_f1", sc, note=notes[a]))
                    continue
                if not te.any():
                    nt = f"not applicable: no labelled test tiles at {mag_str(b)}x"
                    ba_rows.append(_row("probe_ba", sc, note=nt))
                    f1_rows.append(_row("probe_f1", sc, note=nt))
                    continue
                pred = probes[a].predict(X[te])
                conf = _confusions(tcode[te], y[te], pred, S, C)
                tot = conf.sum(0)
                bc = _boot_conf(boot_w, conf)
                ba, ba_b = balanced_accuracy_from_confusion(tot), balanced_accuracy_from_confusion(bc)
                f1, f1_b = macro_f1_from_confusion(tot), macro_f1_from_confusion(bc)
                ba_point[(a, b)], ba_boot[(a, b)] = float(ba), ba_b
                ba_rows.append(_row("probe_ba", sc, ba, *bootstrap_ci(ba_b)))
                f1_rows.append(_row("probe_f1", sc, f1, *bootstrap_ci(f1_b)))
        rows += ba_rows + f1_rows
        r_rows, rcc_rows = [], []
        for a in mags:
            for b in mags:  # all 9 pairs like the probe; R(a->a) = 1 by construction
                sc = pair_str(a, b)
                if (a, b) in ba_point and (a, a) in ba_point:
                    r = retention(ba_point[(a, b)], ba_point[(a, a)])
                    rb = retention(ba_boot[(a, b)], ba_boot[(a, a)])
                    rc = retention_cc(ba_point[(a, b)], ba_point[(a, a)], C)
                    rcb = retention_cc(ba_boot[(a, b)], ba_boot[(a, a)], C)
                    n_r = "" if np.isfinite(r) else f"undefined: BA({mag_str(a)}->{mag_str(a)}) = 0"
                    n_rc = "" if np.isfinite(rc) else \
                        f"undefined: BA({mag_str(a)}->{mag_str(a)}) = chance (1/{C})"
                    r_rows.append(_row("retention", sc, r if np.isfinite(r) else np.nan,
                                       *bootstrap_ci(rb), note=n_r))
                    rcc_rows.append(_row("retention_cc", sc, rc if np.isfinite(rc) else np.nan,
                                         *bootstrap_ci(rcb), note=n_rc))
                else:
                    nt = notes.get(a, "not applicable: BA(a->a) or BA(a->b) missing")
                    r_rows.append(_row("retention", sc, note=nt))
                    rcc_rows.append(_row("retention_cc", sc, note=nt))
        rows += r_rows + rcc_rows
    else:
        for name in ("probe_ba", "probe_f1"):
            rows += [_row(name, pair_str(a, b), note=why_nolab) for a in mags for b in mags]
        for name in ("retention", "retention_cc"):
            rows += [_row(name, pair_str(a, b), note=why_nolab) for a in mags for b in mags]

    # -- clustering ---------------------------------------------------------------------
    km_records = []
    if label_mode:
        base = labelled & is_test & (lev >= 0)
        k = C
    else:
        base = is_test & (lev >= 0)
        k = int(n_clusters) if n_clusters else 8
    idx_g = np.flatnonzero(base)
    ami_rows, dbi_rows = [], []
    if len(idx_g) >= 2:
        cl, _ = _kmeans(X[idx_g], k, seed)
        km_records.append(pd.DataFrame({"row": idx_g, "scope": "global", "cluster": cl}))
        if label_mode:
            ami_rows.append(_row("ami", "global", adjusted_mutual_info_score(y[idx_g], cl)))
        else:
            ami_rows.append(_row("ami", "global", note=why_nolab))
        dbi_rows.append(_row("dbi", "global", _dbi(X[idx_g], cl)))
        leak = adjusted_mutual_info_score(lev[idx_g], cl)
        leak_row = _row("mag_leakage", "global", leak)
    else:
        nt = "not applicable: fewer than 2 test tiles"
        ami_rows.append(_row("ami", "global", note=why_nolab if not label_mode else nt))
        dbi_rows.append(_row("dbi", "global", note=nt))
        leak_row = _row("mag_leakage", "global", note=nt)
    for mi, m in enumerate(mags):
        idx = idx_g[lev[idx_g] == mi]
        sc = mag_str(m)
        if len(idx) < 2:
            nt = f"not applicable: fewer than 2 test tiles at {sc}x"
            ami_rows.append(_row("ami", sc, note=why_nolab if not label_mode else nt))
            dbi_rows.append(_row("dbi", sc, note=nt))
            continue
        cl, _ = _kmeans(X[idx], k, seed)
        km_records.append(pd.DataFrame({"row": idx, "scope": sc, "cluster": cl}))
        if label_mode:
            ami_rows.append(_row("ami", sc, adjusted_mutual_info_score(y[idx], cl)))
        else:
            ami_rows.append(_row("ami", sc, note=why_nolab))
        dbi_rows.append(_row("dbi", sc, _dbi(X[idx], cl)))
    rows += ami_rows + dbi_rows + [leak_row]
    artifacts["kmeans"] = (pd.concat(km_records, ignore_index=True) if km_records else
                           pd.DataFrame({"row": [], "scope": [], "cluster": []}))

    # -- Δhier ------------------------------------------------------------------------
    pairs = [(0, 1), (1, 2), (0, 2)] if len(mags) >= 3 else ([(0, 1)] if len(mags) == 2 else [])
    dh_rows = {"delta_hier": [], "sim_aligned": [], "sim_random": []}
    dh_frames = []
    for ai, bi in pairs:
        sc = pair_str(mags[ai], mags[bi])
        rows_a = np.flatnonzero(is_test & (lev == ai))
        rows_b = np.flatnonzero(is_test & (lev == bi))
        anc = _ancestor_index(slide, keys, rows_a, ai, rows_b)
        ok = anc >= 0
        rb, anc = rows_b[ok], anc[ok]
        par_rows, poc = np.unique(anc, return_inverse=True)
        df = delta_hier(X[par_rows], X[rb], poc, slide[par_rows], rng)
        if len(df) == 0:
            nt = "not applicable: no parents with tissue descendants and another parent on the slide"
            for name in dh_rows:
                dh_rows[name].append(_row(name, sc, note=nt))
            continue
        vals = df[["delta", "sim_aligned", "sim_random"]].to_numpy()
        boots = _bootstrap_means(vals, n_bootstrap, rng)
        for ci, name in enumerate(["delta_hier", "sim_aligned", "sim_random"]):
            dh_rows[name].append(_row(name, sc, vals[:, ci].mean(), *bootstrap_ci(boots[:, ci])))
        prow = par_rows[df["parent"].to_numpy()]
        dh_frames.append(pd.DataFrame({
            "pair": sc, "slide_id": slide[prow], "row": prow,
            "i": keys["i"][prow], "j": keys["j"][prow],
            "n_children": df["n_children"].to_numpy(), "sim_aligned": df["sim_aligned"].to_numpy(),
            "sim_random": df["sim_random"].to_numpy(), "delta": df["delta"].to_numpy()}))
    for name in dh_rows:
        rows += dh_rows[name]
    artifacts["delta_hier"] = (pd.concat(dh_frames, ignore_index=True) if dh_frames else
                               pd.DataFrame(columns=["pair", "slide_id", "row", "i", "j",
                                                     "n_children", "sim_aligned", "sim_random",
                                                     "delta"]))

    # -- segmentation consistency ----------------------------------------------------
    mid_i = next((i for i, m in enumerate(mags) if np.isclose(m, 10.0)), len(mags) // 2)
    mid = mags[mid_i]
    seg_rows = np.flatnonzero(is_test & (lev >= 0))
    pred_all = np.full(len(t0), -1, np.int64)
    seg_source, seg_note = None, ""
    if label_mode and probes.get(mid) is not None:
        pred_all[seg_rows] = probes[mid].predict(X[seg_rows])
        seg_source = f"probe_{mag_str(mid)}x"
    elif label_mode:
        seg_note = notes.get(mid, f"not applicable: no probe at {mag_str(mid)}x")
    else:
        fit_rows = seg_rows[lev[seg_rows] == mid_i]
        if len(fit_rows) >= 2:
            _, km = _kmeans(X[fit_rows], k, seed)
            pred_all[seg_rows] = km.predict(X[seg_rows])
            seg_source = f"kmeans_{mag_str(mid)}x"
        else:
            seg_note = f"not applicable: fewer than 2 test tiles at {mag_str(mid)}x"
    for ai in range(len(mags)):
        for bi in range(ai + 1, len(mags)):
            sc = pair_str(mags[ai], mags[bi])
            if seg_source is None:
                rows.append(_row("seg_consistency", sc, note=seg_note))
                continue
            rows_a = seg_rows[lev[seg_rows] == ai]
            rows_b = seg_rows[lev[seg_rows] == bi]
            anc = _ancestor_index(slide, keys, rows_a, ai, rows_b)
            ok = anc >= 0
            if not ok.any():
                rows.append(_row("seg_consistency", sc,
                                 note="not applicable: no tiles with an embedded ancestor"))
                continue
            agree = (pred_all[rows_b[ok]] == pred_all[anc[ok]]).astype(float)
            g = tcode[rows_b[ok]]
            num = np.bincount(g, weights=agree, minlength=S)
            den = np.bincount(g, minlength=S).astype(float)
            with np.errstate(invalid="ignore", divide="ignore"):
                bb = (boot_w @ num) / (boot_w @ den)
            rows.append(_row("seg_consistency", sc, num.sum() / den.sum(), *bootstrap_ci(bb)))
    for mi, m in enumerate(mags):
        sc = mag_str(m)
        if not label_mode:
            rows.append(_row("seg_miou", sc, note=why_nolab))
            continue
        if seg_source is None:
            rows.append(_row("seg_miou", sc, note=seg_note))
            continue
        te = labelled & is_test & (lev == mi)
        if not te.any():
            rows.append(_row("seg_miou", sc,
                             note=f"not applicable: no labelled test tiles at {sc}x"))
            continue
        conf = _confusions(tcode[te], y[te], pred_all[te], S, C)
        rows.append(_row("seg_miou", sc, miou_from_confusion(conf.sum(0)),
                         *bootstrap_ci(miou_from_confusion(_boot_conf(boot_w, conf)))))
    pcols = [c for c in ("slide_id", "mag", "i", "j", "k", "m", "x0", "y0", "size0")
             if c in t0.columns]
    pred_df = t0.loc[seg_rows, pcols].copy()
    pred_df.insert(0, "row", seg_rows)
    pred_df["label"] = np.where(labelled[seg_rows], lab_raw.to_numpy(object)[seg_rows], None)
    if seg_source is None:
        pred_df["pred"] = None
    elif seg_source.startswith("probe"):
        pred_df["pred"] = np.array(classes, dtype=object)[pred_all[seg_rows]]
    else:
        pred_df["pred"] = [f"cluster {c}" for c in pred_all[seg_rows]]
    pred_df["source"] = seg_source
    artifacts["predictions"] = pred_df.reset_index(drop=True)

    # -- PCA ----------------------------------------------------------------------------
    if pca and len(X) >= 2 and X.shape[1] >= 2:
        Z = PCA(n_components=2, random_state=seed).fit_transform(np.asarray(X, np.float64))
        artifacts["pca"] = pd.DataFrame({
            "row": np.arange(len(t0)), "slide_id": slide, "mag": mag, "split": split,
            "label": np.where(labelled, lab_raw.to_numpy(object), None),
            "pc1": Z[:, 0], "pc2": Z[:, 1]})

    metrics_df = pd.DataFrame(rows, columns=METRIC_COLUMNS)
    # every missing value says why
    bad = metrics_df["value"].isna() & (metrics_df["note"] == "")
    dbi = bad & (metrics_df["metric"] == "dbi")
    metrics_df.loc[dbi, "note"] = ("undefined: Davies-Bouldin needs >= 2 clusters and more "
                                   "tiles than clusters")
    metrics_df.loc[bad & ~dbi, "note"] = "undefined: degenerate input"
    return metrics_df, artifacts


def tidy(metrics_df: pd.DataFrame, experiment: str, encoder: str) -> pd.DataFrame:
    """Tidy table in SPEC column order (+ ``note``; extra columns such as ``seed`` kept last)."""
    df = metrics_df.copy()
    df.insert(0, "encoder", encoder)
    df.insert(0, "experiment", experiment)
    if "note" not in df.columns:
        df["note"] = ""
    df["note"] = df["note"].fillna("")
    extra = [c for c in df.columns if c not in TIDY_COLUMNS]
    return df[TIDY_COLUMNS + extra].reset_index(drop=True)
