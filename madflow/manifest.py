"""The manifest stage: read the user's slide table, open and check every slide, resolve its
base magnification and the level to read each target magnification from (docs/slides.md).

Every bad slide is found in one pass, so a user sees all problems at once."""

from __future__ import annotations

import hashlib
import re
from pathlib import Path

import numpy as np
import pandas as pd

from madflow.labels import LabelError, check_labels, label_files
from madflow.slides import (
    SlideError,
    SlideReader,
    check_readable,
    choose_levels,
    footprint_size,
    mag_str,
    open_slide,
    resolve_base_mag,
)
from madflow.tiling import tissue_mask

REQUIRED = ["slide_id", "path"]
OPTIONAL = ["labels", "objective_power", "mpp", "split"]
# a slide id names output files and travels through shell commands: letters, digits and
# . _ - only, starting with a letter or digit (TCGA barcodes and UUIDs fit)
SLIDE_ID_PATTERN = r"[A-Za-z0-9][A-Za-z0-9._-]*"


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
    # rows with every cell empty (",,," lines a spreadsheet leaves at the end) are not slides
    df = df[(df != "").any(axis=1)]
    if df.empty:
        raise ManifestError(f"manifest {path}: no slides listed")
    bad_split = sorted(set(df["split"]) - {"", "train", "test"})
    if bad_split:
        raise ManifestError(f"manifest {path}: split must be train or test, got {bad_split}")
    # relative paths are relative to the manifest file
    for col in ("path", "labels"):
        df[col] = [str((path.parent / p).resolve()) if p else "" for p in df[col]]
    return df


def file_fingerprint(path) -> str:
    """'size:mtime_ns' of a file ('' when it is missing): any replacement of the file, even
    by an older copy, changes it."""
    try:
        stat = Path(path).stat()
    except OSError:
        return ""
    return f"{stat.st_size}:{stat.st_mtime_ns}"


def input_files(path) -> list[str]:
    """The slide and label files a manifest table names that exist as regular files (the
    manifest stage reports the others, each with its cause)."""
    try:
        table = read_table(path)
    except ManifestError:
        return []  # the manifest stage itself reports it
    files = list(table["path"])
    for labels in table["labels"]:
        if labels:
            files += label_files(labels)
    return [f for f in dict.fromkeys(files) if Path(f).is_file()]


def check_slide(row, mags, tile_px: int, class_map: dict | None = None) -> dict:
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
    classes_in_file = check_labels(row["labels"], (width, height)) if row["labels"] else []
    classes = sorted({(class_map or {}).get(c, c) for c in classes_in_file})
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
        "classes_in_file": ",".join(classes_in_file),
        "classes": ",".join(classes),
        "slide_fingerprint": file_fingerprint(row["path"]),
        "labels_fingerprint": ";".join(file_fingerprint(f) for f in label_files(row["labels"]))
        if row["labels"]
        else "",
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
    coarse = min(mags)
    out["notes"] = "; ".join(zero_tile_notes(row["path"], (width, height), footprint_size(tile_px, base, coarse), coarse))
    return out


def zero_tile_notes(path, slide_size: tuple[int, int], coarse_size: int, coarse_mag: float) -> list[str]:
    """Why a usable slide may give no tissue tiles: smaller than one tile at the coarsest
    magnification, or no tissue in its thumbnail (blank or all-white scan)."""
    notes = []
    width, height = slide_size
    if width < coarse_size or height < coarse_size:
        notes.append(
            f"smaller than one {mag_str(coarse_mag)}x tile ({width} x {height} px, a tile covers "
            f"{coarse_size} px): no {mag_str(coarse_mag)}x tile lies inside it, so it has no {mag_str(coarse_mag)}x "
            "tissue tile (tiles past the slide's edge are never used)"
        )
    with SlideReader(path) as reader:
        thumb, _ = reader.thumbnail(max_side=1024)
    if not tissue_mask(thumb).any():
        notes.append("no tissue detected in its thumbnail (blank or all-white slide): expect 0 tissue tiles")
    return notes


def same_files(paths) -> list[list[int]]:
    """Groups (positions in `paths`, 2 or more) that name one slide file: the same path, a
    link to it, or a copy. Copies are found by content, hashing only files whose sizes
    collide (the first and last MiB: cheap on network storage, and slides that differ
    differ there: headers, tile offsets, associated images)."""
    keys: dict[tuple, list[int]] = {}
    for n, p in enumerate(paths):
        try:
            stat = Path(p).stat()
        except OSError:
            continue  # a missing file is reported with its slide
        keys.setdefault(("inode", stat.st_dev, stat.st_ino), []).append(n)
    by_size: dict[int, list[int]] = {}
    for group in keys.values():
        by_size.setdefault(Path(paths[group[0]]).stat().st_size, []).append(group[0])
    for size, firsts in by_size.items():
        if len(firsts) < 2:
            continue
        for n in firsts:
            keys.setdefault(("content", size, _head_tail_hash(paths[n], size)), []).append(n)
    merged = {n: {n} for n in range(len(paths))}  # union of the inode and content groups
    for group in keys.values():
        union = set().union(*(merged[n] for n in group))
        for n in union:
            merged[n] = union
    return sorted({tuple(sorted(g)) for g in merged.values() if len(g) > 1})


def _head_tail_hash(path, size: int, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        digest.update(fh.read(chunk))
        fh.seek(max(0, size - chunk))
        digest.update(fh.read(chunk))
    return digest.hexdigest()


def check_same_files(table: pd.DataFrame, path) -> None:
    """One slide file under two slide ids is an error listing the rows: above all one in
    train and one in test, where the test set would leak into training."""
    groups = same_files(list(table["path"]))
    if not groups:
        return
    lines = []
    for group in groups:
        rows = [table.iloc[n] for n in group]
        listed = ", ".join(f"line {table.index[n] + 2} ({r['slide_id']}, split {r['split'] or 'unset'})"
                           for n, r in zip(group, rows))
        lines.append(f"  - {listed}: {', '.join(dict.fromkeys(r['path'] for r in rows))}")
    raise ManifestError(
        f"manifest {path}: the same slide file is listed under several slide ids (same path, a link "
        "or an identical copy; in train and test it would leak the test set into training):\n"
        + "\n".join(lines) + "\n  Keep one row per slide file."
    )


def unmatched_class_keys(checked: pd.DataFrame, class_map: dict | None) -> list[str]:
    """Warnings for config `classes:` keys that name no class of any label file (a misspelt
    key renames nothing): each with the class names that do exist."""
    seen = sorted({c for classes in checked["classes_in_file"] for c in classes.split(",") if c})
    return [
        f"classes: {key!r} matches no class in any label file (classes in the label files: "
        f"{', '.join(seen) if seen else 'none'})"
        for key in (class_map or {})
        if key not in seen
    ]


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


def check_slide_id(slide_id: str) -> None:
    if not re.fullmatch(SLIDE_ID_PATTERN, slide_id):
        raise SlideError(
            f"slide_id {slide_id!r} is not allowed: slide ids name output files, so they may hold "
            "only letters, digits and . _ - and must start with a letter or digit"
        )


def require_split(checked: pd.DataFrame, split: str, needed_by: str, source) -> list[str]:
    """The slide ids of `split`; an error naming the cause when there is none (pretraining
    needs a train slide, evaluation a test slide): said once the manifest is checked, not by
    pretraining's argument parser later."""
    ids = list(checked.loc[checked["split"] == split, "slide_id"])
    if not ids:
        counts = checked["split"].value_counts().to_dict()
        raise ManifestError(
            f"{source}: no usable {split} slide ({needed_by} needs at least one; usable slides "
            f"per split: {counts}): set the split column of the manifest, or test_frac"
        )
    return ids


def check_classes(checked: pd.DataFrame, path) -> None:
    """Class names must agree between train and test slides: a class seen only in test slides
    (or only in train) is almost always a spelling ('Tumour' vs 'tumor') that would silently
    lower every labelled metric."""
    per_slide = {
        (split, slide_id): set(classes.split(","))
        for split, slide_id, classes in checked[["split", "slide_id", "classes"]].itertuples(index=False)
        if classes
    }
    seen = {split: set().union(*[c for (s, _), c in per_slide.items() if s == split]) for split in ("train", "test")}
    if not (seen["train"] and seen["test"]):
        return  # labels in one split only: the labelled metrics say why they are not applicable
    problems = []
    for split, other in (("test", "train"), ("train", "test")):
        for name in sorted(seen[split] - seen[other]):
            slides = sorted(sid for (s, sid), c in per_slide.items() if s == split and name in c)
            problems.append(f"  - class {name!r} only in {split} slides ({', '.join(slides)})")
    if problems:
        raise ManifestError(
            f"manifest {path}: class names differ between train and test slides:\n"
            + "\n".join(problems)
            + f"\n  train classes: {sorted(seen['train'])}; test classes: {sorted(seen['test'])}."
            "\n  Fix the label files, or map names in config, e.g. classes: {Tumour: tumor}"
        )


def check_manifest(path, mags, tile_px: int, bad_slides: str, test_frac: float, seed: int,
                   class_map: dict | None = None):
    """(checked manifest, rejected table). With bad_slides='error' raise ManifestError
    listing every bad slide and its cause. `class_map` renames label classes
    (name in file -> name used)."""
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
    check_same_files(table, path)
    mags = sorted(float(m) for m in mags)
    good, bad = [], []
    for _, row in table.iterrows():
        try:
            check_slide_id(row["slide_id"])
            good.append(check_slide(row, mags, tile_px, class_map))
        except Exception as err:  # noqa: BLE001 - every per-slide failure goes into the list
            bad.append({"slide_id": row["slide_id"], "path": row["path"], "cause": _cause(err)})
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
    check_classes(checked, path)
    return checked, rejected


def read_checked_manifest(path) -> pd.DataFrame:
    """The manifest stage's output (results/manifest.tsv) as every later step reads it: every
    value as text (a tile job's row parameter stays the same text), empty cells as ''."""
    return pd.read_csv(path, sep="\t", dtype=str, keep_default_na=False)


def _cause(err: Exception) -> str:
    """Our own errors already name the file and the cause; anything else gets its type."""
    if isinstance(err, (SlideError, LabelError, ValueError)):
        return str(err)
    return f"{type(err).__name__}: {err}"


def slides_overview(checked: pd.DataFrame, rejected: pd.DataFrame, tables: dict, mags) -> pd.DataFrame:
    """One row per manifest slide: used or rejected (with the cause), split, tissue tiles per
    magnification and every note, so that a slide that gave nothing is named, not lost.
    `tables`: slide_id -> its tile table (columns mag, tissue at least)."""
    rows = []
    for slide in checked.itertuples(index=False):
        table = tables[slide.slide_id]
        notes = [n for n in str(slide.notes).split("; ") if n]
        row = {"slide_id": slide.slide_id, "status": "used", "split": slide.split}
        lacking = str(slide.lacking).split(",")
        for mag in sorted(float(m) for m in mags):
            at_mag = table[np.isclose(table["mag"], mag)]
            row[f"tissue_tiles_{mag_str(mag)}x"] = int(at_mag["tissue"].sum())
            if f"{mag_str(mag)}x" in lacking:
                notes.append(f"no {mag_str(mag)}x: finer than the slide's base magnification "
                             f"{float(slide.base_mag):g}x (never invented)")
            elif len(at_mag) and not at_mag["tissue"].any():
                notes.append(f"0 tissue tiles at {mag_str(mag)}x")
        rows.append({**row, "notes": "; ".join(notes)})
    for slide in rejected.itertuples(index=False):
        rows.append({"slide_id": slide.slide_id, "status": "rejected", "split": "", "notes": slide.cause})
    return pd.DataFrame(rows)
