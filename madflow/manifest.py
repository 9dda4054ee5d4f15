"""The manifest stage: read the user's slide table, open and check every slide, resolve its
base magnification and the level to read each target magnification from (SPEC 2-3).

Every bad slide is found in one pass, so a user sees all problems at once."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from madflow.labels import LabelError, check_labels
from madflow.slides import (
    SlideError,
    check_readable,
    choose_levels,
    footprint_size,
    mag_str,
    open_slide,
    resolve_base_mag,
)

REQUIRED = ["slide_id", "path"]
OPTIONAL = ["labels", "objective_power", "mpp", "split"]


class ManifestError(Exception):
    """The manifest itself is unusable, or (bad_slides: error) some slides are bad."""


def read_table(path) -> pd.DataFrame:
    """TSV or CSV (by extension; .tsv/.txt tab-separated) with the required columns."""
    path = Path(path)
    if not path.exists():
        raise ManifestError(f"manifest {path}: file not found")
    sep = "," if path.suffix.lower() == ".csv" else "\t"
    try:
        df = pd.read_csv(path, sep=sep, dtype=str, keep_default_na=False)
    except (pd.errors.ParserError, UnicodeDecodeError) as err:
        raise ManifestError(f"manifest {path}: cannot be parsed ({err})") from None
    df.columns = [c.strip() for c in df.columns]
    missing = [c for c in REQUIRED if c not in df.columns]
    if missing:
        raise ManifestError(
            f"manifest {path}: missing column(s) {', '.join(missing)} "
            f"(has: {', '.join(df.columns)}; required: {', '.join(REQUIRED)})"
        )
    if df.empty:
        raise ManifestError(f"manifest {path}: no slides listed")
    for col in OPTIONAL:
        if col not in df.columns:
            df[col] = ""
    df = df.apply(lambda s: s.str.strip())
    bad_split = sorted(set(df["split"]) - {"", "train", "test"})
    if bad_split:
        raise ManifestError(f"manifest {path}: split must be train or test, got {bad_split}")
    # relative paths are relative to the manifest file
    for col in ("path", "labels"):
        df[col] = [str((path.parent / p).resolve()) if p else "" for p in df[col]]
    return df


def check_slide(row, mags, tile_px: int) -> dict:
    """One checked manifest row; raises SlideError/LabelError naming the cause."""
    slide = open_slide(row["path"])
    try:
        base, mpp, source = resolve_base_mag(slide.properties, row["objective_power"], row["mpp"])
        downsamples = slide.level_downsamples
        width, height = slide.dimensions
        vendor = slide.properties.get("openslide.vendor", "")
    finally:
        slide.close()
    check_readable(row["path"])
    classes = check_labels(row["labels"]) if row["labels"] else []
    plan = choose_levels(downsamples, base, mags)
    out = {
        "slide_id": row["slide_id"],
        "path": row["path"],
        "labels": row["labels"],
        "split": row["split"],
        "base_mag": base,
        "mpp": mpp if mpp else np.nan,
        "mag_source": source,
        "vendor": vendor,
        "width": width,
        "height": height,
        "level_count": len(downsamples),
        "level_downsamples": ",".join(f"{d:.4f}" for d in downsamples),
        "classes": ",".join(classes),
    }
    for mag in mags:
        choice = plan[mag]
        key = mag_str(mag)
        if choice is not None:
            footprint_size(tile_px, base, mag)  # raises if T*base/mag is not whole
        out[f"level_{key}"] = "" if choice is None else choice.level
        out[f"downsample_{key}"] = "" if choice is None else round(choice.downsample, 6)
        out[f"native_{key}"] = "" if choice is None else choice.native
    lacking = [mag_str(m) + "x" for m in mags if plan[m] is None]
    out["lacking"] = ",".join(lacking)
    if plan[min(mags)] is None:
        raise SlideError(f"{row['path']}: base magnification {base:g}x is below every target")
    return out


def assign_split(df: pd.DataFrame, test_frac: float, seed: int) -> pd.DataFrame:
    """Seeded slide-level split for rows without one (never by tile)."""
    todo = df.index[df["split"] == ""]
    if len(todo):
        rng = np.random.default_rng(seed)
        order = rng.permutation(sorted(df.loc[todo, "slide_id"]))
        n_test = max(1, round(test_frac * len(order))) if len(order) > 1 else 0
        test = set(order[:n_test])
        df.loc[todo, "split"] = ["test" if s in test else "train" for s in df.loc[todo, "slide_id"]]
        df.loc[todo, "split_source"] = "seeded"
    return df


def check_manifest(path, mags, tile_px: int, bad_slides: str, test_frac: float, seed: int):
    """(checked manifest, rejected table). With bad_slides='error' raise ManifestError
    listing every bad slide and its cause."""
    table = read_table(path)
    dups = table["slide_id"][table["slide_id"].duplicated(keep=False)]
    if len(dups):
        raise ManifestError(
            f"manifest {path}: duplicate slide_id(s): {', '.join(sorted(set(dups)))} "
            "(slide ids name output files and must be unique)"
        )
    empty = table.index[(table["slide_id"] == "") | (table["path"] == "")]
    if len(empty):
        rows = ", ".join(str(i + 2) for i in empty)
        raise ManifestError(f"manifest {path}: empty slide_id or path on line(s) {rows}")
    mags = sorted(float(m) for m in mags)
    good, bad = [], []
    for _, row in table.iterrows():
        try:
            good.append(check_slide(row, mags, tile_px))
        except (SlideError, LabelError, ValueError) as err:
            bad.append({"slide_id": row["slide_id"], "path": row["path"], "cause": str(err)})
    rejected = pd.DataFrame(bad, columns=["slide_id", "path", "cause"])
    lines = "\n".join(f"  - {b['slide_id']}: {b['cause']}" for b in bad)
    if bad and bad_slides == "error":
        raise ManifestError(
            f"manifest {path}: {len(bad)} of {len(table)} slide(s) cannot be used "
            f"(set bad_slides: skip to leave them out):\n{lines}"
        )
    if not good:
        raise ManifestError(f"manifest {path}: no usable slide among {len(table)}:\n{lines}")
    checked = pd.DataFrame(good)
    checked["split_source"] = np.where(checked["split"] == "", "", "manifest")
    checked = assign_split(checked, test_frac, seed)
    return checked, rejected


def read_checked_manifest(path) -> pd.DataFrame:
    """The manifest stage's output (results/manifest.tsv) as every later step reads it:
    slide ids as text, empty cells as empty strings."""
    return pd.read_csv(path, sep="\t", dtype={"slide_id": str}, keep_default_na=False)
