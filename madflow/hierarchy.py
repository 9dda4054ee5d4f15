"""The tile hierarchy's keys and its one ancestor lookup, shared by training and evaluation.

A tile at hierarchy depth d (0 = the coarsest grid) is keyed by (slide, i, j) plus the first
d of (k, m): a 10x tile is (i, j, k), its 40x children (i, j, k, m). The ancestor of a finer
tile at depth d is the tile with the same first 2 + d grid keys on the same slide.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

GRID_KEYS = ("i", "j", "k", "m")  # row, column, child index at depth 1, at depth 2
CHILD_KEYS = GRID_KEYS[2:]        # the keys that are null above their depth


def grid_keys(depth: int) -> list[str]:
    """The grid key columns of a tile at hierarchy depth ``depth``."""
    return list(GRID_KEYS[: 2 + int(depth)])


def key_arrays(tiles: pd.DataFrame) -> dict[str, np.ndarray]:
    """Each grid key column as int64, -1 where the tile has no such key."""
    out = {}
    for col in GRID_KEYS:
        if col in tiles.columns:
            out[col] = pd.to_numeric(tiles[col], errors="coerce").fillna(-1).to_numpy(np.int64)
        else:
            out[col] = np.full(len(tiles), -1, np.int64)
    return out


def depth_of(tiles: pd.DataFrame) -> int:
    """Hierarchy depth of tiles at one magnification: how many child keys they carry."""
    return sum(1 for col in CHILD_KEYS if col in tiles.columns and tiles[col].notna().any())


def ancestor_rows(slide: np.ndarray, keys: dict[str, np.ndarray], rows_a: np.ndarray,
                  depth_a: int, rows_b: np.ndarray) -> np.ndarray:
    """For each row in ``rows_b`` (finer tiles), the row of its ancestor among ``rows_a``
    (tiles at hierarchy depth ``depth_a``), or -1 when that ancestor is not in ``rows_a``.
    ``slide`` and ``keys`` (see :func:`key_arrays`) are indexed by row."""
    rows_a = np.asarray(rows_a, np.int64)
    rows_b = np.asarray(rows_b, np.int64)
    if len(rows_a) == 0 or len(rows_b) == 0:
        return np.full(len(rows_b), -1, np.int64)
    cols = grid_keys(depth_a)
    index_a = pd.MultiIndex.from_arrays([slide[rows_a]] + [keys[c][rows_a] for c in cols])
    duplicated = index_a.duplicated()
    if duplicated.any():  # defensive: keep the first of duplicated tiles
        index_a, rows_a = index_a[~duplicated], rows_a[~duplicated]
    index_b = pd.MultiIndex.from_arrays([slide[rows_b]] + [keys[c][rows_b] for c in cols])
    pos = index_a.get_indexer(index_b)
    return np.where(pos >= 0, rows_a[np.maximum(pos, 0)], -1)
