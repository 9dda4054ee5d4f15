"""Ground-truth labels for evaluation only: QuPath-style GeoJSON or a label-mask image.

Both are turned into a per-class coverage raster on a regular grid (level-0 pixels per cell
given by the caller), from which the tiler derives each tile's majority class and purity.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image


UNLABELLED = 0  # mask value of unlabelled pixels
GEOMETRY_MARGIN = 0.01  # annotations may overshoot the slide by 1% of its larger side


class LabelError(Exception):
    """An unreadable or malformed label file, named in the message."""


def load_geojson(path) -> list[tuple[str, list]]:
    """[(class_name, [polygon, ...])] where polygon = [exterior, *holes] in level-0 px."""
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise LabelError(f"{path}: label file not found") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise LabelError(f"{path}: not valid GeoJSON ({err})") from None
    features = data.get("features") if isinstance(data, dict) else data
    if isinstance(data, dict) and data.get("type") == "Feature":
        features = [data]
    if not isinstance(features, list):
        raise LabelError(f"{path}: GeoJSON has no feature list")
    shapes = []
    for n, feat in enumerate(features):
        try:
            props = feat.get("properties") or {}
            cls = props.get("classification", {}).get("name") or props.get("name")
            geom = feat["geometry"]
            if geom["type"] == "Polygon":
                polys = [geom["coordinates"]]
            elif geom["type"] == "MultiPolygon":
                polys = geom["coordinates"]
            else:
                continue  # points/lines carry no area
        except (AttributeError, KeyError, TypeError) as err:
            raise LabelError(f"{path}: feature {n} is malformed ({err!r})") from None
        if not cls:
            raise LabelError(f"{path}: feature {n} has no classification.name")
        shapes.append((str(cls), polys))
    return shapes


def load_mask(path) -> tuple[np.ndarray, dict[int, str]]:
    """A label-mask image (any resolution, covering the whole slide) and its class table,
    read from `<mask stem>.classes.tsv` beside it (columns: value, name; 0 = unlabelled)."""
    path = Path(path)
    table = class_table_path(path)
    try:
        mask = np.asarray(Image.open(path))
    except (OSError, ValueError) as err:
        raise LabelError(f"{path}: label mask cannot be read ({err})") from None
    if mask.ndim != 2:
        raise LabelError(f"{path}: label mask must be single-channel, got shape {mask.shape}")
    if not table.exists():
        raise LabelError(f"{path}: class table {table.name} not found beside the mask")
    classes = {}
    for n, line in enumerate(table.read_text().splitlines()[1:], start=2):
        if line.strip():
            try:
                value, name = line.split("\t")[:2]
                classes[int(value)] = name.strip()
            except ValueError:
                raise LabelError(f"{table}: line {n} is not '<integer value>\t<class name>': {line!r}") from None
    return mask, classes


def label_files(path) -> list[str]:
    """Every file a label entry reads: the GeoJSON, or the mask and its class table."""
    path = Path(path)
    if is_geojson(path):
        return [str(path)]
    return [str(path), str(class_table_path(path))]


def is_geojson(path) -> bool:
    return Path(path).suffix.lower() in (".geojson", ".json")


def class_table_path(mask_path) -> Path:
    mask_path = Path(mask_path)
    return mask_path.with_name(mask_path.stem + ".classes.tsv")


def check_labels(path, slide_size: tuple[int, int]) -> list[str]:
    """Validate a label file against its slide (level-0 width, height); return its class
    names. Geometry outside the slide, a mask of another aspect ratio than the slide and
    mask values missing from the class table are errors: each would label tiles wrongly or
    not at all without a word."""
    if is_geojson(path):
        shapes = load_geojson(path)
        if not shapes:
            raise LabelError(
                f"{path}: no polygon annotation (an empty FeatureCollection, or only points or lines, "
                "which cover no area): no tile could be labelled; leave the slide's labels cell empty "
                "if it has no annotations"
            )
        _check_geometry_inside(path, shapes, slide_size)
        return sorted({cls for cls, _ in shapes})
    mask, classes = load_mask(path)
    _check_mask_shape(path, mask.shape, slide_size)
    unknown = sorted(set(np.unique(mask).tolist()) - set(classes) - {UNLABELLED})
    if unknown:
        raise LabelError(
            f"{path}: mask value(s) {unknown} are not in {class_table_path(path).name} "
            f"(it lists {sorted(classes)}; {UNLABELLED} = unlabelled)"
        )
    return sorted(set(classes.values()))


def _check_geometry_inside(path, shapes, slide_size) -> None:
    """Every vertex within the slide, up to a margin of GEOMETRY_MARGIN of its larger side
    (annotations drawn to the edge may overshoot it a little)."""
    width, height = slide_size
    margin = GEOMETRY_MARGIN * max(width, height)
    outside, lo, hi = 0, np.full(2, np.inf), np.full(2, -np.inf)
    for _, polys in shapes:
        points = np.concatenate([np.asarray(ring, np.float64)[:, :2] for rings in polys for ring in rings])
        lo, hi = np.minimum(lo, points.min(axis=0)), np.maximum(hi, points.max(axis=0))
        if (points.min(axis=0) < -margin).any() or (points.max(axis=0) > [width + margin, height + margin]).any():
            outside += 1
    if outside:
        raise LabelError(
            f"{path}: {outside} of {len(shapes)} annotation(s) lie outside the slide: the geometry "
            f"spans x {lo[0]:g}..{hi[0]:g}, y {lo[1]:g}..{hi[1]:g} but the slide is {width} x {height} "
            "px at level 0 (coordinates must be level-0 pixels of this slide)"
        )


def _check_mask_shape(path, shape, slide_size) -> None:
    """The mask must be the slide scaled by one factor f, up to rounding of its sides:
    some f with |W/f - w| < 1 and |H/f - h| < 1."""
    (h, w), (width, height) = shape, slide_size
    lowest = max(width / (w + 1), height / (h + 1))
    highest = min(width / max(w - 1, 1e-9), height / max(h - 1, 1e-9))
    if lowest >= highest:
        raise LabelError(
            f"{path}: label mask is {w} x {h} px but the slide is {width} x {height} px: their "
            "aspect ratios differ beyond rounding, so the mask cannot cover the slide (a mask must "
            "be the whole slide scaled down by one factor)"
        )


def _ring_mask(ring: np.ndarray, w: int, h: int) -> np.ndarray:
    """Pixels of a w x h raster whose centres lie inside a polygon ring (raster units):
    centre sampling gives exact areas for grid-aligned shapes, unlike edge-inclusive fills."""
    from matplotlib.path import Path as MplPath

    mask = np.zeros((h, w), bool)
    if len(ring) < 3:
        return mask
    x0, y0 = np.clip(np.floor(ring.min(axis=0)).astype(int), 0, [w, h])
    x1, y1 = np.clip(np.ceil(ring.max(axis=0)).astype(int), 0, [w, h])
    if x0 >= x1 or y0 >= y1:
        return mask
    yy, xx = np.mgrid[y0:y1, x0:x1]
    centres = np.column_stack([xx.ravel() + 0.5, yy.ravel() + 0.5])
    mask[y0:y1, x0:x1] = MplPath(ring).contains_points(centres).reshape(yy.shape)
    return mask


def coverage(
    path, grid_w: int, grid_h: int, cell0: float, slide_size: tuple[int, int],
    class_map: dict[str, str] | None = None,
) -> tuple[np.ndarray, list[str]]:
    """Per-class area fraction of each grid cell: float32 (n_classes, grid_h, grid_w).

    Cell (r, c) covers level-0 [c*cell0, (c+1)*cell0) x [r*cell0, (r+1)*cell0). Rasterised
    at `sub` x `sub` samples per cell, so fractions are accurate to 1/sub**2. `class_map`
    renames classes of the file (name in file -> name used); classes mapped to one name
    are merged."""
    sub = 4
    w, h = grid_w * sub, grid_h * sub
    scale = sub / cell0
    class_map = class_map or {}

    def used(name):
        return class_map.get(name, name)

    if is_geojson(path):
        shapes = load_geojson(path)
        names = sorted({used(cls) for cls, _ in shapes})
        index = np.zeros((h, w), np.int32)
        for cls, polys in shapes:
            value = names.index(used(cls)) + 1
            for rings in polys:
                inside = None
                for r, ring in enumerate(rings):
                    hit = _ring_mask(np.asarray(ring, np.float64)[:, :2] * scale, w, h)
                    inside = hit if r == 0 else inside & ~hit  # later rings are holes
                if inside is not None:
                    index[inside] = value
    else:
        mask, table = load_mask(path)
        names = sorted({used(name) for name in table.values()})
        lut = np.zeros(max(int(mask.max()), max(table)) + 1, np.int32)
        for value, name in table.items():
            lut[value] = names.index(used(name)) + 1
        # the mask spans the whole slide; the grid may extend past it (padding = unlabelled)
        mw = min(w, round(slide_size[0] * scale))
        mh = min(h, round(slide_size[1] * scale))
        index = np.zeros((h, w), np.int32)
        index[:mh, :mw] = lut[np.asarray(Image.fromarray(mask).resize((mw, mh), Image.NEAREST))]
    onehot = np.stack([(index == c + 1) for c in range(len(names))]).astype(np.float32)
    frac = onehot.reshape(len(names), grid_h, sub, grid_w, sub).mean(axis=(2, 4))
    return frac, names
