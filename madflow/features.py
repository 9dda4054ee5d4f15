"""Embedding files without torch: reading madflow's per-slide files (one group per
magnification, docs/CONTRACTS.md) for evaluation, and exporting them in the layout that
CLAM's and TRIDENT's MIL loaders read: one file per slide, encoder and magnification with
root-level `features` [N, D] and `coords` [N, 2] (the tiler's coords attributes), and CLAM's
`.pt` (the features tensor)."""

from __future__ import annotations

import shutil
from pathlib import Path

import h5py
import numpy as np
import pandas as pd

from madflow.io import write_atomic
from madflow.slides import mag_str


def find_embedding_files(folders, tables) -> list[Path]:
    """The embedding file of each tile table's slide (same stem), in the tables' order, found
    anywhere under ``folders`` (the embed jobs' output folders)."""
    files = {f.stem: f for folder in folders for f in Path(folder).rglob("*.h5")}
    missing = [Path(t).stem for t in tables if Path(t).stem not in files]
    if missing:
        raise FileNotFoundError(f"no embedding file for slide(s) {missing} under {[str(f) for f in folders]}")
    return [files[Path(t).stem] for t in tables]


def load_embeddings(paths, tables) -> tuple[pd.DataFrame, np.ndarray]:
    """Join embedding files with their tile tables: (tiles DataFrame, X) row-aligned."""
    frames, xs = [], []
    for path, table in zip(paths, tables):
        grid = pd.read_parquet(table)
        with h5py.File(path, "r") as h5:
            for name, g in h5.items():
                mag = float(g.attrs["magnification"])
                key = pd.DataFrame({c: g[c][:] for c in ("i", "j", "k", "m")})
                key["mag"] = mag
                rows = grid[grid["mag"] == mag].copy()
                for c in ("k", "m"):
                    rows[c] = rows[c].fillna(-1).astype(np.int32)
                merged = key.merge(rows, on=["mag", "i", "j", "k", "m"], how="left", validate="1:1")
                if merged["x0"].isna().any():
                    raise ValueError(f"{path} [{name}]: tiles missing from the tile table {table}")
                frames.append(merged)
                xs.append(g["features"][:])
    tiles = pd.concat(frames, ignore_index=True)
    for c in ("k", "m"):
        tiles[c] = tiles[c].astype("Int32").where(tiles[c] >= 0)
    return tiles, np.concatenate(xs).astype(np.float32)


def read_coords(path) -> tuple[np.ndarray, dict]:
    """(coords [N, 2], attributes) of a tiler coords file, as TRIDENT's read_coords does."""
    with h5py.File(path, "r") as h5:
        return h5["coords"][:], dict(h5["coords"].attrs)


def trident_folder(mag: float, tile_px: int) -> str:
    """The folder TRIDENT's Processor.run_patching_job names after its settings (a91fa84):
    `{mag}x_{patch_size}px_{overlap}px_overlap` (10 -> '10x', 2.5 -> '2.5x')."""
    return f"{mag_str(mag)}x_{int(tile_px)}px_0px_overlap"


def export_slide(embeddings_path, coords_paths, h5_paths, pt_paths, mags, trident_patches=None,
                 trident_features=None) -> list[int]:
    """Write one slide's embeddings per magnification (`mags`, in the order of the path
    lists) as CLAM feature files (`h5_paths`, `pt_paths`) and, when given, in TRIDENT's job
    layout: the coords as `patches/{slide}_patches.h5` (`trident_patches`) and the features
    as `features_{encoder}/{slide}.h5` (`trident_features`, the same file as CLAM's h5);
    returns the tile count per magnification.

    A magnification the slide lacks (or that has no tissue tile) gets empty `features`
    [0, D] and `coords` [0, 2], with the coords attributes, so loaders see zero tiles."""
    import torch  # only for CLAM's .pt

    with h5py.File(embeddings_path, "r") as h5:
        encoder = str(h5.attrs["encoder"])
        groups = {float(g.attrs["magnification"]): (g["features"][:], g["coords"][:]) for g in h5.values()}
    dim = next((x.shape[1] for x, _ in groups.values()), 0)
    counts = []
    trident_patches = trident_patches or [None] * len(mags)
    trident_features = trident_features or [None] * len(mags)
    for mag, coords_path, h5_path, pt_path, patches_path, features_path in zip(
        mags, coords_paths, h5_paths, pt_paths, trident_patches, trident_features
    ):
        coords, attrs = read_coords(coords_path)
        features, embedded_at = groups.get(float(mag), (np.zeros((0, dim), np.float32), np.zeros((0, 2), np.int64)))
        if not np.array_equal(coords, embedded_at):
            raise ValueError(
                f"{embeddings_path} [{mag_str(mag)}x] holds {len(embedded_at)} tiles that differ from the "
                f"{len(coords)} of {coords_path}: the embeddings and the tiles come from different runs"
            )

        def write_h5(tmp, features=features, coords=coords, attrs=attrs):
            with h5py.File(tmp, "w") as out:
                ds = out.create_dataset("features", data=features.astype(np.float32))
                ds.attrs.update(encoder=encoder, name=attrs["name"])
                out.create_dataset("coords", data=coords).attrs.update(attrs)

        write_atomic(h5_path, write_h5)
        write_atomic(pt_path, lambda tmp, features=features: torch.save(torch.from_numpy(features.astype(np.float32)), tmp))
        if patches_path is not None:
            write_atomic(patches_path, lambda tmp, src=coords_path: shutil.copyfile(src, tmp))
        if features_path is not None:
            write_atomic(features_path, write_h5)
        counts.append(len(features))
    return counts
