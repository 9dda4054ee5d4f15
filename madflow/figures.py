"""Paper-style figures (those of the report), drawn from tidy metric tables and evaluate() artifacts.

Every drawing function takes ``out`` (a path with or without ``.png``/``.pdf``) and writes
both ``<out>.png`` and ``<out>.pdf`` atomically (temporary file, then ``os.replace``); it
returns the two paths.  Colours are consistent across figures: one per experiment
(``experiment_palette``), one per magnification (``mag_palette``), one per class
(``class_palette``).

Inputs
------
* tidy metric tables: columns ``experiment, encoder, metric, scope, value, ci_low, ci_high``
  (+ ``note``, optional ``seed``), concatenated across experiments for the comparison
  figures.  With several rows per (experiment, metric, scope) (several seeds) bars show the
  mean and +-1 sd; with one, the bootstrap 95% CI.
* ``artifacts["pca"]``, ``artifacts["delta_hier"]`` (+ an ``experiment`` column when
  several are concatenated), ``artifacts["predictions"]`` from ``madflow.metrics.evaluate``.
* training logs ``train_log.tsv`` (step, pair, loss, ..., teacher_entropy, prototypes_used).
"""
from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Iterable, Mapping, Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import seaborn as sns  # noqa: E402
from matplotlib.colors import ListedColormap, to_hex  # noqa: E402
from matplotlib.patches import Patch  # noqa: E402

from madflow.io import write_atomic  # noqa: E402
from madflow.slides import mag_str  # noqa: E402
from madflow.summary import run_stats  # noqa: E402
from matplotlib.ticker import FuncFormatter  # noqa: E402

__all__ = [
    "experiment_palette", "mag_palette", "class_palette", "save_figure", "probe_heatmap",
    "retention_bars", "clustering_bars", "embedding_map", "delta_hier_dist",
    "segmentation_maps", "training_curves", "tiling_qc",
]

# fixed colours for the named experiments (docs/config.md), so a figure never recolours
# an experiment because another one was added or removed
_KNOWN_EXPERIMENTS = ["mad", "same_mag", "shuffled", "interp", "pair_10_40", "tri",
                      "random_init", "color_stats", "supervised", "base", "same_mag_scratch"]
_BASE = [to_hex(c) for c in sns.color_palette("tab10", 10)] + ["#393b79"]
_EXTRA = [to_hex(c) for c in sns.color_palette("tab20b", 20)] + \
    [to_hex(c) for c in sns.color_palette("tab20c", 20)]
_MAG_COLOURS = {"2.5": "#1b9e77", "10": "#d95f02", "40": "#7570b3", "20": "#e7298a",
                "5": "#66a61e", "1.25": "#e6ab02"}

_STYLE = {
    "figure.dpi": 100, "savefig.dpi": 200, "font.size": 9, "axes.titlesize": 10,
    "axes.labelsize": 9, "xtick.labelsize": 8, "ytick.labelsize": 8, "legend.fontsize": 8,
    "axes.spines.top": False, "axes.spines.right": False, "pdf.fonttype": 42,
}


def _style():
    sns.set_theme(context="paper", style="whitegrid", rc=_STYLE)


def _mag_str(m) -> str:
    """mag_str for labels that may already be strings such as "global"."""
    try:
        return mag_str(m)
    except (TypeError, ValueError):
        return str(m)


def _mag_key(s) -> float:
    try:
        return float(s)
    except (TypeError, ValueError):
        return np.inf


def _pair_key(p: str):
    a, _, b = str(p).partition("->")
    return (_mag_key(a), _mag_key(b))


# ----------------------------------------------------------------------------- palettes
def experiment_palette(names: Iterable[str]) -> dict[str, str]:
    """Colour per experiment, stable across figures: the named experiments have fixed
    colours, any other name (``external:...``) gets one from its name's hash."""
    out = {}
    for n in names:
        n = str(n)
        if n in _KNOWN_EXPERIMENTS:
            out[n] = _BASE[_KNOWN_EXPERIMENTS.index(n)]
        elif n not in out:
            h = int(hashlib.md5(n.encode()).hexdigest(), 16)
            out[n] = _EXTRA[h % len(_EXTRA)]
    return out


def mag_palette(mags: Iterable) -> dict[str, str]:
    """Colour per magnification, keyed by ``mag_str`` (``"2.5"``, ``"10"``, ``"40"``)."""
    out = {}
    cmap = plt.get_cmap("viridis")
    for m in mags:
        s = _mag_str(m)
        if s in _MAG_COLOURS:
            out[s] = _MAG_COLOURS[s]
        else:
            v = (np.log2(max(_mag_key(s), 0.5)) + 1) / 8 if np.isfinite(_mag_key(s)) else 0.5
            out[s] = to_hex(cmap(float(np.clip(v, 0, 1))))
    return out


def class_palette(classes: Iterable[str]) -> dict[str, str]:
    """Colour per class name, assigned in sorted order."""
    cl = sorted({str(c) for c in classes})
    pal = sns.color_palette("tab10" if len(cl) <= 10 else "tab20", max(len(cl), 1))
    return {c: to_hex(pal[i % len(pal)]) for i, c in enumerate(cl)}


# ----------------------------------------------------------------------------- saving
def _out_base(out) -> Path:
    p = Path(out)
    return p.with_suffix("") if p.suffix.lower() in (".png", ".pdf") else p


def save_figure(fig, out) -> list[str]:
    """Write ``<out>.png`` and ``<out>.pdf`` atomically; close the figure; return paths."""
    base = _out_base(out)
    base.parent.mkdir(parents=True, exist_ok=True)
    paths = []
    try:
        for ext in ("png", "pdf"):
            final = base.parent / f"{base.name}.{ext}"
            write_atomic(final, lambda tmp, ext=ext: fig.savefig(tmp, format=ext, bbox_inches="tight"))
            paths.append(str(final))
    finally:
        plt.close(fig)
    return paths


def _empty(ax, text):
    ax.text(0.5, 0.5, text, ha="center", va="center", transform=ax.transAxes,
            fontsize=9, color="0.4", wrap=True)
    ax.set_xticks([])
    ax.set_yticks([])


# ----------------------------------------------------------------------------- aggregation
def _aggregate(df: pd.DataFrame) -> pd.DataFrame:
    """Mean over runs per (experiment, metric, scope): error bars = CI with one run,
    mean +- sd with several (seeds)."""
    d = df.copy()
    if "experiment" not in d.columns:
        d["experiment"] = "experiment"
    for c in ("ci_low", "ci_high"):
        if c not in d.columns:
            d[c] = np.nan
    rows = []
    for (e, m, s), g in d.groupby(["experiment", "metric", "scope"], sort=False):
        if len(g) == 1:
            rows.append((e, m, s, g["value"].iloc[0], g["ci_low"].iloc[0], g["ci_high"].iloc[0], 1, ""))
        else:
            mu, sd, n = run_stats(g["value"])
            rows.append((e, m, s, mu, mu - sd, mu + sd, n, "sd"))
    return pd.DataFrame(rows, columns=["experiment", "metric", "scope", "value", "lo", "hi",
                                       "n", "err"])


def _experiment_legend(fig, exps: list[str], pal: dict) -> None:
    handles = [Patch(color=pal[e], label=e) for e in exps]
    fig.legend(handles=handles, loc="upper center", ncol=min(len(exps), 8),
               bbox_to_anchor=(0.5, 1.08), frameon=False, title="Experiment")


def _experiments(df) -> list[str]:
    if "experiment" not in df.columns:
        return ["experiment"]
    return list(dict.fromkeys(df["experiment"].astype(str)))


def _grouped_bars(ax, agg: pd.DataFrame, metric: str, scopes: Sequence[str],
                  experiments: Sequence[str], palette: Mapping[str, str]):
    sub = agg[agg.metric == metric]
    n = max(len(experiments), 1)
    width = 0.8 / n
    x = np.arange(len(scopes))
    any_bar = False
    for ei, e in enumerate(experiments):
        vals, lo, hi = [], [], []
        for s in scopes:
            r = sub[(sub.experiment == e) & (sub.scope == s)]
            if len(r):
                vals.append(r.value.iloc[0]), lo.append(r.lo.iloc[0]), hi.append(r.hi.iloc[0])
            else:
                vals.append(np.nan), lo.append(np.nan), hi.append(np.nan)
        vals, lo, hi = (np.asarray(v, float) for v in (vals, lo, hi))
        any_bar |= bool(np.isfinite(vals).any())
        pos = x - 0.4 + width * (ei + 0.5)
        ax.bar(pos, np.nan_to_num(vals), width * 0.92, color=palette[e], label=e,
               edgecolor="none")
        has_err = np.isfinite(vals) & np.isfinite(lo) & np.isfinite(hi)
        if has_err.any():
            err = np.vstack([np.clip(vals - lo, 0, None), np.clip(hi - vals, 0, None)])
            ax.errorbar(pos[has_err], vals[has_err], yerr=err[:, has_err], fmt="none",
                        ecolor="0.2", elinewidth=0.8, capsize=2)
        for p, v in zip(pos, vals):
            if not np.isfinite(v):
                ax.text(p, 0, "n/a", ha="center", va="bottom", fontsize=6, rotation=90,
                        color="0.4")
    ax.set_xticks(x)
    ax.set_xticklabels(scopes)
    fin = sub["value"].to_numpy(float)
    fin = fin[np.isfinite(fin)]
    if len(fin):  # keep 0 in view, with headroom for error bars and small values
        hi_all = np.nanmax(np.r_[fin, sub["hi"].to_numpy(float)[np.isfinite(sub["hi"].to_numpy(float))]])
        lo_all = np.nanmin(np.r_[fin, sub["lo"].to_numpy(float)[np.isfinite(sub["lo"].to_numpy(float))]])
        top = max(hi_all * 1.08, 0.1 if hi_all <= 1 else hi_all * 1.08)
        bottom = min(0.0, lo_all * 1.1 if lo_all < 0 else 0.0)
        if bottom < 0:
            bottom = min(bottom, -0.05 * top)
        ax.set_ylim(bottom, top)
    return any_bar


# ----------------------------------------------------------------------------- figures
def probe_heatmap(metrics_df: pd.DataFrame, experiment: str | None, out) -> list[str]:
    """Heatmap of balanced accuracy BA(a->b) (rows: train magnification a, columns: test
    magnification b), annotated with the value and its 95% CI."""
    _style()
    df = metrics_df
    if experiment is not None and "experiment" in df.columns:
        df = df[df["experiment"].astype(str) == str(experiment)]
    agg = _aggregate(df[df.metric == "probe_ba"]) if len(df) else _aggregate(df)
    agg = agg[agg.metric == "probe_ba"]
    mags = sorted({p for s in agg.scope for p in str(s).split("->")}, key=_mag_key)
    fig, ax = plt.subplots(figsize=(1.2 * max(len(mags), 2) + 1.6, 1.0 * max(len(mags), 2) + 1.2))
    title = "Probe transfer: balanced accuracy" + (f" ({experiment})" if experiment else "")
    if agg.value.notna().sum() == 0:
        note = ""
        if "note" in df.columns and len(df[df.metric == "probe_ba"]):
            n = df[df.metric == "probe_ba"]["note"].iloc[0]
            note = "" if pd.isna(n) else str(n)
        _empty(ax, note or "no probe results")
        ax.set_title(title)
        return save_figure(fig, out)
    M = np.full((len(mags), len(mags)), np.nan)
    ann = np.empty(M.shape, dtype=object)
    for _, r in agg.iterrows():
        a, b = str(r.scope).split("->")
        i, j = mags.index(a), mags.index(b)
        M[i, j] = r.value
        if np.isfinite(r.value):
            ci = f"\n[{r.lo:.2f}, {r.hi:.2f}]" if np.isfinite(r.lo) and np.isfinite(r.hi) else ""
            ann[i, j] = f"{r.value:.2f}{ci}"
    ann = np.where(ann == None, "n/a", ann)  # noqa: E711
    sns.heatmap(M, ax=ax, annot=ann, fmt="", vmin=0, vmax=1, cmap="viridis",
                annot_kws={"fontsize": 7}, linewidths=0.5, linecolor="white",
                xticklabels=[f"{m}×" for m in mags], yticklabels=[f"{m}×" for m in mags],
                cbar_kws={"label": "Balanced accuracy (fraction)"})
    ax.set_xlabel("Test magnification b (×)")
    ax.set_ylabel("Train magnification a (×)")
    ax.set_title(title)
    return save_figure(fig, out)


def retention_bars(summary_df: pd.DataFrame, out, pairs: Sequence[str] | None = None) -> list[str]:
    """Grouped bars across experiments: BA(a->b), retention R(a->b) and chance-corrected
    Rcc(a->b), with 95% CI (or +-1 sd over seeds).  ``pairs`` defaults to the
    coarse->fine pairs present (``2.5->10``, ``10->40``, ``2.5->40``)."""
    _style()
    exps = _experiments(summary_df)
    pal = experiment_palette(exps)
    agg = _aggregate(summary_df[summary_df.metric.isin(["probe_ba", "retention", "retention_cc"])])
    if pairs is None:
        sc = agg.loc[agg.metric == "retention", "scope"].unique().tolist()
        pairs = [p for p in sc if _pair_key(p)[0] < _pair_key(p)[1]] or sc
        pairs = sorted(pairs, key=lambda p: (_pair_key(p)[1] - _pair_key(p)[0], _pair_key(p)))
    pairs = list(pairs)
    fig, axes = plt.subplots(1, 3, figsize=(3.2 * 3 + 0.4 * len(exps), 3.0), sharey=False)
    specs = [("probe_ba", "Balanced accuracy BA(a→b)", "Balanced accuracy (fraction)"),
             ("retention", "Retention R = BA(a→b) / BA(a→a)", "Retention R (ratio)"),
             ("retention_cc", "Chance-corrected retention Rcc", "Rcc (ratio, chance = 0)")]
    for ax, (metric, title, ylab) in zip(axes, specs):
        if not pairs or not _grouped_bars(ax, agg, metric, pairs, exps, pal):
            _empty(ax, "not applicable: no labels")
        if metric != "probe_ba":
            ax.axhline(1.0, color="0.3", lw=0.8, ls="--")
        ax.axhline(0.0, color="0.3", lw=0.6)
        lo, hi = ax.get_ylim()
        if metric != "probe_ba" and (lo < -1.5 or hi > 2.5):
            # a ratio whose denominator is near chance has a huge CI; keep the bars readable
            ax.set_ylim(max(lo, -1.5), min(hi, 2.5))
            ylab += " (axis clipped)"
        ax.set_title(title)
        ax.set_ylabel(ylab)
        ax.set_xlabel("Magnification pair a→b (×)")
    _experiment_legend(fig, exps, pal)
    err = "95% bootstrap CI over test slides" if (_aggregate(summary_df).n <= 1).all() \
        else "mean ± sd over seeds (CI when one seed)"
    fig.suptitle(f"Magnification transfer of a linear probe (error bars: {err})", y=1.16,
                 fontsize=10)
    fig.tight_layout()
    return save_figure(fig, out)


def clustering_bars(summary_df: pd.DataFrame, out) -> list[str]:
    """AMI (clusters vs labels), Davies-Bouldin index and magnification leakage, global and
    per magnification, across experiments."""
    _style()
    exps = _experiments(summary_df)
    pal = experiment_palette(exps)
    agg = _aggregate(summary_df[summary_df.metric.isin(["ami", "dbi", "mag_leakage"])])
    scopes = sorted(agg.loc[agg.metric.isin(["ami", "dbi"]), "scope"].unique(),
                    key=lambda s: (s != "global", _mag_key(s)))
    fig, axes = plt.subplots(1, 3, figsize=(9.6 + 0.4 * len(exps), 3.0),
                             gridspec_kw={"width_ratios": [len(scopes) or 1, len(scopes) or 1, 1.2]})
    specs = [("ami", scopes, "AMI(k-means clusters, class)", "AMI (higher = better)"),
             ("dbi", scopes, "Davies–Bouldin index", "DBI (lower = better)"),
             ("mag_leakage", ["global"], "Magnification leakage", "AMI(clusters, magnification)\n(lower = better)")]
    for ax, (metric, sc, title, ylab) in zip(axes, specs):
        labels = [s if s == "global" else f"{s}×" for s in sc]
        if not sc or not _grouped_bars(ax, agg, metric, sc, exps, pal):
            _empty(ax, "not applicable: no labels" if metric == "ami" else "no values")
        else:
            ax.set_xticklabels(labels)
        ax.axhline(0.0, color="0.3", lw=0.6)
        ax.set_title(title)
        ax.set_ylabel(ylab)
        ax.set_xlabel("Clustering scope (pooled or magnification)")
    _experiment_legend(fig, exps, pal)
    fig.suptitle("Clustering of tile embeddings (k-means, k = number of classes)", y=1.16,
                 fontsize=10)
    fig.tight_layout()
    return save_figure(fig, out)


def embedding_map(pca_df: pd.DataFrame, out, max_points: int = 20000, seed: int = 0,
                  title: str | None = None) -> list[str]:
    """2-D PCA of the embeddings: left coloured by class (by slide when there are no
    labels), right by magnification.  ``title`` (e.g. the experiment) prefixes the title."""
    _style()
    d = pca_df
    ms_all = d["mag"].map(_mag_str)
    n_mag = max(ms_all.nunique(), 1)
    balanced = False
    if len(d) > max_points:  # equal share per magnification (40x would hide the others)
        per = max_points // n_mag
        d = (d.groupby(ms_all, group_keys=False, sort=False)
             .apply(lambda g: g.sample(min(len(g), per), random_state=seed)))
        balanced = True
    fig, axes = plt.subplots(1, 2, figsize=(9.0, 4.0), sharex=True, sharey=True)
    has_lab = "label" in d.columns and d["label"].notna().any()
    ax = axes[0]
    if has_lab:
        lab = d["label"].where(d["label"].notna(), None)
        pal = class_palette(lab.dropna().unique())
        unl = lab.isna().to_numpy()
        if unl.any():
            ax.scatter(d.pc1[unl], d.pc2[unl], s=2, c="0.85", lw=0, label="unlabelled / impure",
                       rasterized=True)
        for c, col in pal.items():
            sel = (lab == c).to_numpy()
            ax.scatter(d.pc1[sel], d.pc2[sel], s=3, c=col, lw=0, label=c, rasterized=True)
        ax.set_title("Coloured by class")
        ax.legend(markerscale=3, frameon=False, title="Class", loc="best")
    else:
        sl = d["slide_id"].astype(str) if "slide_id" in d.columns else pd.Series(["all"] * len(d))
        cats = sorted(sl.unique())
        pal = dict(zip(cats, [to_hex(c) for c in sns.color_palette("husl", len(cats))]))
        ax.scatter(d.pc1, d.pc2, s=3, c=[pal[s] for s in sl], lw=0, rasterized=True)
        ax.set_title("Coloured by slide (no labels)")
    ax = axes[1]
    mags = sorted({_mag_str(m) for m in d["mag"]}, key=_mag_key)
    mp = mag_palette(mags)
    ms = d["mag"].map(_mag_str)
    counts = ms.value_counts()
    for m in sorted(mags, key=lambda m: -counts.get(m, 0)):  # rarest on top
        sel = (ms == m).to_numpy()
        ax.scatter(d.pc1[sel], d.pc2[sel], s=3 if sel.sum() > 2000 else 6, c=mp[m], lw=0,
                   label=f"{m}× (n={sel.sum():,})", rasterized=True)
    ax.set_title("Coloured by magnification")
    h, l = ax.get_legend_handles_labels()
    o = sorted(range(len(l)), key=lambda i: _mag_key(l[i].split("×")[0]))
    ax.legend([h[i] for i in o], [l[i] for i in o], markerscale=3, frameon=False,
              title="Magnification", loc="best")
    for ax in axes:
        ax.set_xlabel("PC 1 (embedding units)")
    axes[0].set_ylabel("PC 2 (embedding units)")
    sub = (f"{len(d):,} tiles, subsampled to ≤{max_points // n_mag:,} per magnification"
           if balanced else f"{len(d):,} tiles")
    head = f"{title}: embedding map" if title else "Embedding map"
    fig.suptitle(f"{head} (PCA of tile embeddings; {sub})", fontsize=10)
    fig.tight_layout()
    return save_figure(fig, out)


def delta_hier_dist(per_parent_df: pd.DataFrame, out) -> list[str]:
    """Distribution over parents of sim_aligned - sim_random per magnification pair and
    experiment (violins with quartiles; the dashed line is 0 = no spatial correspondence)."""
    _style()
    d = per_parent_df.copy()
    if "experiment" not in d.columns:
        d["experiment"] = "experiment"
    if "delta" not in d.columns:
        d["delta"] = d["sim_aligned"] - d["sim_random"]
    exps = list(dict.fromkeys(d["experiment"].astype(str)))
    pairs = sorted(d["pair"].astype(str).unique(),
                   key=lambda p: (_pair_key(p)[1] - _pair_key(p)[0], _pair_key(p)))
    pal = experiment_palette(exps)
    fig, ax = plt.subplots(figsize=(2.0 + 1.3 * max(len(pairs), 1) * max(1, len(exps) ** 0.5), 3.4))
    if len(d) == 0:
        _empty(ax, "no parents with tissue descendants")
    else:
        d["experiment"] = d["experiment"].astype(str)
        sns.violinplot(data=d, x="pair", y="delta", hue="experiment", order=pairs,
                       hue_order=exps, palette=pal, inner="quart", cut=0, linewidth=0.7,
                       density_norm="width", ax=ax)
        ax.axhline(0, color="0.3", lw=0.8, ls="--")
        means = d.groupby(["pair", "experiment"])["delta"].mean()
        n = len(exps)
        for pi, p in enumerate(pairs):
            for ei, e in enumerate(exps):
                if (p, e) in means.index:
                    x = pi - 0.4 + 0.8 * (ei + 0.5) / n
                    ax.plot(x, means[(p, e)], marker="D", ms=3, color="k", zorder=5)
        ax.legend(frameon=False, title="Experiment", loc="center left",
                  bbox_to_anchor=(1.0, 0.5))
    ax.set_xlabel("Magnification pair (parent → descendants, ×)")
    ax.set_ylabel("sim_aligned − sim_random (cosine)")
    ax.set_title("Δhier per parent tile (◆ = mean = Δhier)")
    fig.tight_layout()
    return save_figure(fig, out)


def _class_grid(df: pd.DataFrame, col: str, codes: Mapping[str, int], W: int, H: int):
    """Raster of class codes at the tile grid of one magnification (NaN = no tile)."""
    size = float(df["size0"].min())
    nx, ny = int(np.ceil(W / size)), int(np.ceil(H / size))
    img = np.full((ny, nx), np.nan)
    v = df[col]
    ok = v.notna().to_numpy()
    if ok.any():
        gx = (df["x0"].to_numpy(float)[ok] / size).astype(int)
        gy = (df["y0"].to_numpy(float)[ok] / size).astype(int)
        keep = (gx >= 0) & (gy >= 0) & (gx < nx) & (gy < ny)
        img[gy[keep], gx[keep]] = [codes[str(c)] for c in v[ok][keep]]
    return img, nx * size, ny * size


def segmentation_maps(pred_df: pd.DataFrame, tiles_df: pd.DataFrame | None, slide_id: str,
                      out, min_purity: float = 0.8) -> list[str]:
    """Per magnification, the predicted class map of one slide (top row; the 10x probe, or
    the 10x k-means clusters when label-free) beside the ground truth (bottom row: tile
    labels with purity >= ``min_purity``)."""
    _style()
    p = pred_df[pred_df["slide_id"].astype(str) == str(slide_id)]
    t = None
    if tiles_df is not None:
        t = tiles_df[tiles_df["slide_id"].astype(str) == str(slide_id)]
    ref = t if t is not None and len(t) else p
    mags = sorted({_mag_str(m) for m in ref["mag"]}, key=_mag_key) if len(ref) else []
    if len(ref):
        W = float((ref["x0"] + ref["size0"]).max())
        H = float((ref["y0"] + ref["size0"]).max())
    else:
        W = H = 1.0
    MIXED = f"mixed (purity < {min_purity:g})"
    gt = (t if t is not None and "label" in t.columns else p).copy()
    if len(gt) and "label" in gt.columns:
        gt["label"] = gt["label"].astype(object).where(gt["label"].notna(), None)
        if "label_purity" in gt.columns:
            pur = pd.to_numeric(gt["label_purity"], errors="coerce").to_numpy(float)
            impure = gt["label"].notna().to_numpy() & ~(pur >= min_purity)
            gt.loc[impure, "label"] = MIXED
    has_gt = len(gt) > 0 and "label" in gt.columns and gt["label"].notna().any()
    names = set(p["pred"].dropna().astype(str)) if "pred" in p.columns else set()
    if has_gt:
        names |= set(gt["label"].dropna().astype(str)) - {MIXED}
    pal = class_palette(names)
    if has_gt and (gt["label"] == MIXED).any():
        pal[MIXED] = "#d9d9d9"
    codes = {c: i for i, c in enumerate(pal)}
    cmap = ListedColormap(list(pal.values()) or ["#cccccc"]).with_extremes(bad="white")
    kfmt = FuncFormatter(lambda v, _: f"{v / 1000:g}")
    ncol = max(len(mags), 1)
    fig, axes = plt.subplots(2, ncol, figsize=(2.9 * ncol + 1.6, 5.8), squeeze=False)
    src = str(p["source"].dropna().iloc[0]) if "source" in p.columns and p["source"].notna().any() else "prediction"
    for ci, m in enumerate(mags):
        for ri, (d, col, lab) in enumerate([(p, "pred", f"Predicted ({src})"),
                                            (gt, "label", "Ground truth")]):
            ax = axes[ri, ci]
            dm = d[d["mag"].map(_mag_str) == m] if len(d) else d
            if ri == 1 and not has_gt:
                _empty(ax, "not applicable: no labels")
            elif len(dm) == 0 or col not in dm.columns or dm[col].notna().sum() == 0:
                _empty(ax, "no tiles" if len(dm) == 0 else
                       ("no labelled tiles" if ri else "no predictions"))
            else:
                img, w, h = _class_grid(dm, col, codes, W, H)
                ax.imshow(np.ma.masked_invalid(img), cmap=cmap, vmin=-0.5,
                          vmax=len(codes) - 0.5, interpolation="nearest",
                          extent=(0, w, h, 0))
                ax.set_xlim(0, W)
                ax.set_ylim(H, 0)
                ax.set_xlabel("x (level-0 px × 1000)")
                ax.set_ylabel("y (level-0 px × 1000)")
                ax.xaxis.set_major_formatter(kfmt)
                ax.yaxis.set_major_formatter(kfmt)
                ax.set_aspect("equal")
                ax.grid(False)
            ax.set_title(f"{lab}, {m}×", fontsize=8)
    handles = [Patch(color=c, label=n) for n, c in pal.items()]
    if handles:
        fig.legend(handles=handles, loc="center left", bbox_to_anchor=(1.0, 0.5),
                   frameon=False, title="Class" if src.startswith("probe") else "Class / cluster")
    fig.suptitle(f"Segmentation maps per magnification, slide {slide_id}", fontsize=10)
    fig.tight_layout()
    return save_figure(fig, out)


def training_curves(log_dfs: Mapping[str, pd.DataFrame], out, smooth: int = 10) -> list[str]:
    """Loss, teacher entropy and prototypes used vs step, one line per experiment (raw values
    faint, rolling mean over ``smooth`` logged steps solid)."""
    _style()
    exps = list(log_dfs)
    pal = experiment_palette(exps)
    specs = [("loss", "Training loss", "Loss (cross-entropy, nats)"),
             ("teacher_entropy", "Teacher output entropy", "Entropy (nats)"),
             ("prototypes_used", "Prototypes used", "Prototypes used (count)")]
    fig, axes = plt.subplots(1, 3, figsize=(10.5, 3.0))
    for ax, (col, title, ylab) in zip(axes, specs):
        drawn = False
        for e in exps:
            d = log_dfs[e]
            if d is None or col not in d.columns or "step" not in d.columns or len(d) == 0:
                continue
            s = (d[["step", col]].apply(pd.to_numeric, errors="coerce").dropna()
                 .groupby("step")[col].mean().sort_index())
            if len(s) == 0:
                continue
            ax.plot(s.index, s.values, color=pal[e], alpha=0.25, lw=0.6)
            ax.plot(s.index, s.rolling(max(1, smooth), min_periods=1).mean().values,
                    color=pal[e], lw=1.4, label=e)
            drawn = True
        if not drawn:
            _empty(ax, f"'{col}' not logged")
        ax.set_title(title)
        ax.set_xlabel("Training step (optimizer updates)")
        ax.set_ylabel(ylab)
    handles = [Patch(color=pal[e], label=e) for e in exps]
    fig.tight_layout()
    fig.legend(handles=handles, loc="center left", bbox_to_anchor=(1.0, 0.5),
               frameon=False, title="Experiment")
    return save_figure(fig, out)


def tiling_qc(qc_pngs: Sequence, out, max_slides: int = 12, ncols: int = 4) -> list[str]:
    """Montage of the per-slide tiling QC thumbnails (``results/tiles/qc/<slide>.png``,
    drawn by ``madflow.tiling.qc_image``: tissue mask tinted blue, coarsest-magnification
    grid with tissue tiles outlined green, others grey), titled by slide id."""
    _style()
    paths = sorted(str(p) for p in qc_pngs)
    shown = paths[:max_slides]
    n = max(len(shown), 1)
    ncols = min(ncols, n)
    nrows = int(np.ceil(n / ncols))
    fig, axes = plt.subplots(nrows, ncols, figsize=(2.6 * ncols, 2.6 * nrows + 0.4),
                             squeeze=False)
    for ax in axes.ravel():
        ax.axis("off")
    if not shown:
        _empty(axes[0, 0], "no QC thumbnails")
    for ax, p in zip(axes.ravel(), shown):
        try:
            ax.imshow(plt.imread(p), interpolation="lanczos")
        except Exception as e:  # an unreadable thumbnail should not hide the others
            _empty(ax, f"unreadable: {type(e).__name__}")
        ax.set_title(Path(p).stem, fontsize=8)
    more = f" (first {len(shown)} of {len(paths)} slides)" if len(paths) > len(shown) else ""
    fig.suptitle("Tiling QC: tissue mask (blue tint) and coarsest grid "
                 f"(green = tissue tile, grey = background){more}", fontsize=9)
    handles = [Patch(facecolor="#3caaff", alpha=0.5, label="tissue mask"),
               Patch(facecolor="none", edgecolor="#00c800", label="tissue tile"),
               Patch(facecolor="none", edgecolor="#969696", label="background tile")]
    fig.tight_layout()
    fig.legend(handles=handles, loc="lower center", ncol=3, frameon=False,
               bbox_to_anchor=(0.5, -0.04))
    return save_figure(fig, out)
