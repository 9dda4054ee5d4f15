"""Tissue mask and the exact hierarchical tile grid of docs/CONTRACTS.md.

Every coordinate is an integer multiple of the finest footprint, so a child's footprint is
exactly 1/r**2 of its parent's and the r*r children partition the parent whatever the
level sizes. Tissue fraction and label coverage are computed once on the finest grid and
averaged up the hierarchy, so a parent's value is exactly the mean of its children's.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
from PIL import Image, ImageDraw, ImageFilter

from madflow import labels as labels_mod
from madflow.hierarchy import GRID_KEYS
from madflow.io import write_atomic
from madflow.slides import SlideReader, choose_levels, footprint_size, level_read_size, level_read_sizes, mag_str



def ratios(mags) -> list[int]:
    """Integer ratios between consecutive magnifications (coarse -> fine)."""
    out = []
    for lo, hi in zip(mags[:-1], mags[1:]):
        r = hi / lo
        if abs(r - round(r)) > 1e-9 or round(r) < 2:
            raise ValueError(
                f"magnifications {mag_str(lo)} -> {mag_str(hi)}: ratio {r:g} is not an integer >= 2"
            )
        out.append(round(r))
    return out


def build_grid(width: int, height: int, base_mag: float, mags, tile_px: int) -> pd.DataFrame:
    """All tiles of the hierarchy covering a width x height level-0 image.

    Coarsest tiles (i, j) start at (j*S, i*S); the grid covers the slide (the last row and
    column may run past its edge: such tiles are kept, never tissue, see `inside_slide`)."""
    mags = sorted(float(m) for m in mags)
    if len(mags) > len(GRID_KEYS) - 1:
        raise ValueError(f"at most {len(GRID_KEYS) - 1} magnifications are supported")
    steps = ratios(mags)
    size = footprint_size(tile_px, base_mag, mags[0])
    ny, nx = -(-height // size), -(-width // size)
    ii, jj = np.meshgrid(np.arange(ny), np.arange(nx), indexing="ij")
    cols = {"i": ii.ravel(), "j": jj.ravel(), "x0": jj.ravel() * size, "y0": ii.ravel() * size}
    frames = [_frame(mags[0], cols, size, tile_px)]
    for depth, r in enumerate(steps, start=1):
        child = size // r
        if child * r != size:
            raise ValueError(f"footprint {size} px is not divisible by the ratio {r}")
        dy, dx = np.divmod(np.arange(r * r), r)
        cols = {name: np.repeat(vals, r * r) for name, vals in cols.items()}
        n_parents = len(cols["x0"]) // (r * r)
        cols[GRID_KEYS[depth + 1]] = np.tile(r * dy + dx, n_parents)
        cols["x0"] = cols["x0"] + np.tile(dx, n_parents) * child
        cols["y0"] = cols["y0"] + np.tile(dy, n_parents) * child
        size = child
        frames.append(_frame(mags[depth], cols, size, tile_px))
    return pd.concat(frames, ignore_index=True)


def _frame(mag, cols, size, tile_px) -> pd.DataFrame:
    n = len(cols["x0"])
    df = pd.DataFrame({"mag": np.full(n, mag, np.float64)})
    df["i"] = cols["i"].astype(np.int32)
    df["j"] = cols["j"].astype(np.int32)
    for name in GRID_KEYS[2:]:
        df[name] = pd.array(cols[name] if name in cols else [pd.NA] * n, dtype="Int32")
    df["x0"] = cols["x0"].astype(np.int64)
    df["y0"] = cols["y0"].astype(np.int64)
    df["size0"] = np.int64(size)
    df["tile_px"] = np.int32(tile_px)
    return df


def fine_values(grid: pd.DataFrame, fine: np.ndarray) -> np.ndarray:
    """Value of each grid row from an array on the finest grid (..., ny_f, nx_f): the mean
    over the row's finest descendants (for finest rows, the cell itself)."""
    fine_size = int(grid["size0"].min())
    out = np.empty(fine.shape[:-2] + (len(grid),), np.float32)
    for size, idx in grid.groupby("size0").indices.items():
        r = int(size) // fine_size
        lead = fine.shape[:-2]
        h, w = fine.shape[-2] // r, fine.shape[-1] // r
        blocks = fine.reshape(*lead, h, r, w, r).mean(axis=(-3, -1))
        rows = grid["y0"].to_numpy()[idx] // size
        cols = grid["x0"].to_numpy()[idx] // size
        out[..., idx] = blocks[..., rows, cols]
    return out


def otsu_threshold(values: np.ndarray) -> float:
    hist = np.bincount(values.ravel(), minlength=256).astype(np.float64)
    p = hist / hist.sum()
    omega = np.cumsum(p)
    mu = np.cumsum(p * np.arange(256))
    between = (mu[-1] * omega - mu) ** 2 / np.maximum(omega * (1 - omega), 1e-12)
    return float(np.argmax(between))


def tissue_mask(thumb: np.ndarray) -> np.ndarray:
    """Boolean tissue mask of an RGB thumbnail: Otsu on HSV saturation (floored so a blank
    slide is not all tissue), excluding near-black pixels, median-filtered and closed."""
    hsv = np.asarray(Image.fromarray(thumb).convert("HSV"))
    sat = np.asarray(Image.fromarray(hsv[..., 1]).filter(ImageFilter.MedianFilter(5)))
    mask = (sat > max(otsu_threshold(sat), 20)) & (hsv[..., 2] > 30)
    img = Image.fromarray(mask.astype(np.uint8) * 255)
    img = img.filter(ImageFilter.MaxFilter(5)).filter(ImageFilter.MinFilter(5))
    return np.asarray(img) > 127


def _to_fine_grid(mask: np.ndarray, mask_ds: float, fine_size: int, ny_f: int, nx_f: int):
    """Area-average a low-resolution boolean mask onto the finest tile grid."""
    ext_w = round(nx_f * fine_size / mask_ds)
    ext_h = round(ny_f * fine_size / mask_ds)
    canvas = np.zeros((max(ext_h, mask.shape[0]), max(ext_w, mask.shape[1])), np.float32)
    canvas[: mask.shape[0], : mask.shape[1]] = mask
    img = Image.fromarray(canvas[:ext_h, :ext_w], mode="F")
    return np.asarray(img.resize((nx_f, ny_f), Image.BOX), np.float32).clip(0, 1)


def tile_slide(slide: dict, mags, tile_px: int, min_tissue: float, class_map: dict | None = None):
    """Tile table, tissue thumbnail and mask for one checked manifest row (see CONTRACTS);
    `class_map` renames label classes (name in file -> name used)."""
    mags = sorted(float(m) for m in mags)
    present = [m for m in mags if str(slide.get(f"level_{mag_str(m)}", "")) not in ("", "nan")]
    with SlideReader(slide["path"]) as reader:
        width, height = reader.level_dimensions[0]
        base = float(slide["base_mag"])
        grid = build_grid(width, height, base, mags, tile_px)
        grid = grid[grid["mag"].isin(present)].reset_index(drop=True)
        thumb, thumb_ds = reader.thumbnail()
        plan = choose_levels(reader.level_downsamples, base, present)
        level_dims = np.asarray(reader.level_dimensions, np.int64)
    mask = tissue_mask(thumb)
    coarse_size = footprint_size(tile_px, base, mags[0])
    fine_size = footprint_size(tile_px, base, mags[-1])
    per_coarse = coarse_size // fine_size
    ny_f, nx_f = -(-height // coarse_size) * per_coarse, -(-width // coarse_size) * per_coarse
    tissue_fine = _to_fine_grid(mask, thumb_ds, fine_size, ny_f, nx_f)

    grid.insert(0, "slide_id", str(slide["slide_id"]))
    grid["level"] = grid["mag"].map(lambda m: plan[m].level).astype(np.int32)
    grid["downsample"] = grid["mag"].map(lambda m: plan[m].downsample).astype(np.float64)
    grid["native"] = grid["mag"].map(lambda m: plan[m].native).astype(bool)
    grid["tissue_frac"] = fine_values(grid, tissue_fine)
    grid["inside"] = inside_slide(grid, level_dims)
    grid["tissue"] = (grid["tissue_frac"] >= min_tissue) & grid["inside"]
    grid["label"] = pd.array([None] * len(grid), dtype="string")
    grid["label_purity"] = np.float32(np.nan)
    label_path = slide.get("labels")
    if isinstance(label_path, str) and label_path:
        frac, names = labels_mod.coverage(label_path, nx_f, ny_f, fine_size, (width, height), class_map)
        if names:
            per_tile = fine_values(grid, frac)  # (n_classes, n_tiles)
            best = per_tile.argmax(axis=0)
            purity = per_tile.max(axis=0)
            lab = np.asarray(names, dtype=object)[best]
            lab[purity <= 0] = None
            grid["label"] = pd.array(lab, dtype="string")
            grid["label_purity"] = purity.astype(np.float32)
    grid["path"] = str(slide["path"])
    return grid, thumb, thumb_ds, mask


def inside_slide(grid: pd.DataFrame, level_dims: np.ndarray) -> np.ndarray:
    """Whether each tile's pixels lie within the slide (the edge-tile rule, docs/slides.md):
    its level-0 footprint within level 0, and the region read for it at its level within that
    level, both as madflow maps it (x // step, n px) and as OpenSlide's read_region does, which
    CLAM's reader calls with the coords' patch_level and patch_size (x / downsample, sub-pixel
    interpolated: one more pixel where the downsample is not whole). A tile past the right or
    bottom edge would read padding that the tools and madflow fill differently (OpenSlide:
    transparent, read black; madflow: white), so such a tile is never a tissue tile: never
    exported, embedded or trained on."""
    width, height = level_dims[0]
    x0, y0, size0 = (grid[c].to_numpy(np.int64) for c in ("x0", "y0", "size0"))
    level = grid["level"].to_numpy(np.int64)
    downsample = grid["downsample"].to_numpy(np.float64)
    step, n = level_read_sizes(grid)
    margin = (np.abs(downsample - step) > 1e-9).astype(np.int64)
    lw, lh = level_dims[level, 0], level_dims[level, 1]

    def end(c0):  # the last level pixel (exclusive) either mapping needs
        return np.maximum(c0 // step + n, np.ceil(c0 / downsample + n).astype(np.int64) + margin)

    return (x0 + size0 <= width) & (y0 + size0 <= height) & (end(x0) <= lw) & (end(y0) <= lh)


def coords_attrs(slide: dict, mag: float, tile_px: int, level=None, downsample=None) -> dict:
    """Attributes of a `coords` dataset that CLAM's and TRIDENT's readers both read right.

    CLAM reads `patch_size` pixels at `patch_level` from each (x, y); TRIDENT reads
    `patch_size * level0_magnification / target_magnification` level-0 pixels and resizes
    them to `patch_size`. Both cover the tile's footprint only if `patch_size` is the pixels
    read at `patch_level` and `target_magnification` is the magnification of those pixels.
    Where the magnification has a native level that is `mag` itself; where it is resized
    from a finer level (10x of a 20x scan: 2 * T px of level 0) it is the finer level's, and
    `magnification` / `tile_px` keep what madflow embeds (T px at `mag`). A lacking
    magnification (level None) gets an empty `coords` with lacking=True and the same keys."""
    base = float(slide["base_mag"])
    attrs = {
        "level0_magnification": base,
        "level0_width": int(slide["width"]),
        "level0_height": int(slide["height"]),
        "overlap": 0,
        "name": str(slide["slide_id"]),
        "magnification": float(mag),
        "tile_px": int(tile_px),
        "lacking": level is None,
    }
    if level is None:
        return {**attrs, "patch_level": 0, "patch_size": int(tile_px), "target_magnification": float(mag),
                "patch_size_level0": max(1, round(tile_px * base / mag)), "native": False}
    size0 = footprint_size(tile_px, base, mag)
    step, n = level_read_size(size0, downsample)
    return {**attrs, "patch_level": int(level), "patch_size": n, "patch_size_level0": size0,
            "target_magnification": base * n / size0, "native": bool(n == tile_px)}


def write_coords_h5(grid: pd.DataFrame, slide: dict, mag: float, tile_px: int, path) -> None:
    """Level-0 (x, y) of the tissue tiles at one magnification as an HDF5 `coords` dataset
    with the attributes of `coords_attrs` (one slide: its checked manifest row)."""
    import h5py

    at_mag = grid[grid["mag"] == mag]
    rows = at_mag[at_mag["tissue"]]
    level, downsample = (at_mag["level"].iloc[0], at_mag["downsample"].iloc[0]) if len(at_mag) else (None, None)
    attrs = coords_attrs(slide, mag, tile_px, level, downsample)

    def write(tmp):
        with h5py.File(tmp, "w") as h5:
            ds = h5.create_dataset("coords", data=rows[["x0", "y0"]].to_numpy(np.int64).reshape(-1, 2))
            ds.attrs.update(attrs)

    write_atomic(path, write)


def qc_image(thumb: np.ndarray, thumb_ds: float, mask: np.ndarray, grid: pd.DataFrame) -> Image.Image:
    """Thumbnail with the tissue mask tinted and the coarsest grid drawn (tissue tiles green,
    others grey)."""
    base = Image.fromarray(thumb).convert("RGB")
    tint = np.asarray(base, np.float32)
    tint[mask] = 0.6 * tint[mask] + 0.4 * np.array([60, 170, 255])
    img = Image.fromarray(tint.astype(np.uint8))
    draw = ImageDraw.Draw(img)
    coarse = grid[grid["mag"] == grid["mag"].min()]
    for row in coarse.itertuples(index=False):
        x, y, s = row.x0 / thumb_ds, row.y0 / thumb_ds, row.size0 / thumb_ds
        colour = (0, 200, 0) if row.tissue else (150, 150, 150)
        draw.rectangle([x, y, x + s - 1, y + s - 1], outline=colour, width=1)
    return img
