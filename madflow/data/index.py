"""The training slides' tissue tiles and their parent -> descendant relations (no pixels)."""

from __future__ import annotations

import math
from typing import Iterable, Sequence

import numpy as np
import pandas as pd

from madflow.hierarchy import ancestor_rows, depth_of, key_arrays
from madflow.slides import mag_str


def load_tables(paths: Iterable[str]) -> pd.DataFrame:
    dfs = [pd.read_parquet(p) for p in paths]
    if not dfs:
        raise ValueError("no tile tables given")
    return pd.concat(dfs, ignore_index=True)


class TileIndex:
    """Tissue tiles of the training slides and their parent -> descendant relations.

    Row numbers used everywhere are positions in ``self.df`` (tissue rows only).
    """

    def __init__(self, tables: pd.DataFrame | Sequence[pd.DataFrame], min_purity: float = 0.8):
        self.min_purity = float(min_purity)  # a tile is labelled when one class covers this much
        if isinstance(tables, pd.DataFrame):
            df = tables
        else:
            df = pd.concat(list(tables), ignore_index=True)
        if "tissue" in df.columns:
            df = df[df["tissue"].astype(bool).to_numpy()]
        df = df.reset_index(drop=True)
        if df.empty:
            raise ValueError("the tile tables hold no tissue tiles")
        self.df = df
        self.mag = df["mag"].to_numpy(dtype=np.float64)
        self.mags = sorted(float(m) for m in np.unique(self.mag))
        self.slide_code, self.slides = pd.factorize(df["slide_id"].astype(str))
        self.slide_code = np.asarray(self.slide_code, dtype=np.int64)
        self.tile_px = int(df["tile_px"].iloc[0])
        # hierarchy depth of each magnification (0 = coarsest ancestor grid (i, j))
        self.depth = {m: depth_of(df[self.mag == m]) for m in self.mags}
        self._keys = key_arrays(df)
        self._rows_by_mag = {m: np.flatnonzero(self.mag == m) for m in self.mags}
        self._desc: dict = {}
        self._labelled: dict = {}
        self._eligible: dict = {}
        self._other_slide: dict = {}

    # -- basic lookups ------------------------------------------------------------------
    def rows_at(self, mag: float) -> np.ndarray:
        mag = self._check_mag(mag)
        return self._rows_by_mag[mag]

    def labelled_rows(self, mag: float) -> np.ndarray:
        """Rows at ``mag`` whose majority class covers at least ``min_purity`` of the tile
        (computed once per magnification: the supervised sampler asks every step)."""
        mag = self._check_mag(mag)
        if mag not in self._labelled:
            rows = self.rows_at(mag)
            if "label" not in self.df.columns or "label_purity" not in self.df.columns:
                self._labelled[mag] = rows[:0]
            else:
                sub = self.df.iloc[rows]
                ok = sub["label"].notna().to_numpy() & (sub["label_purity"].fillna(0).to_numpy() >= self.min_purity)
                self._labelled[mag] = rows[ok]
        return self._labelled[mag]

    def _check_mag(self, mag: float) -> float:
        mag = float(mag)
        for m in self.mags:
            if math.isclose(m, mag, rel_tol=1e-6):
                return m
        raise ValueError(f"magnification {mag_str(mag)} not in the tissue tiles (have {[mag_str(m) for m in self.mags]})")

    def descendants(self, a: float, b: float):
        """CSR relation parents(at a) -> tissue descendants(at b).

        Returns (parents [P], ptr [P+1], rows [sum]) where rows[ptr[p]:ptr[p+1]] are the
        descendants of parents[p] in row order; only parents with at least one tissue descendant."""
        a, b = self._check_mag(a), self._check_mag(b)
        key = (a, b)
        if key in self._desc:
            return self._desc[key]
        da, db = self.depth[a], self.depth[b]
        if db <= da:
            raise ValueError(f"{mag_str(b)} is not finer than {mag_str(a)} in the tile hierarchy")
        children = self._rows_by_mag[b]
        ancestor = ancestor_rows(self.slide_code, self._keys, self._rows_by_mag[a], da, children)
        found = ancestor >= 0
        order = np.lexsort((children[found], ancestor[found]))
        prow = ancestor[found][order]
        crow = children[found][order]
        parents, counts = np.unique(prow, return_counts=True)
        ptr = np.zeros(len(parents) + 1, dtype=np.int64)
        np.cumsum(counts, out=ptr[1:])
        self._desc[key] = (parents, ptr, crow)
        return self._desc[key]

    def children_of(self, parent_row: int, b: float) -> np.ndarray:
        a = float(self.mag[parent_row])
        parents, ptr, rows = self.descendants(a, b)
        p = np.searchsorted(parents, parent_row)
        if p >= len(parents) or parents[p] != parent_row:
            return np.zeros(0, dtype=np.int64)
        return rows[ptr[p]:ptr[p + 1]]

    def eligible(self, chain: Sequence[float], n_local: int):
        """Parents at chain[0] with >= n_local tissue descendants at every later magnification.

        Returns (parents [P], [(ptr, rows) per later magnification] aligned with parents)."""
        chain = tuple(self._check_mag(m) for m in chain)
        key = (chain, int(n_local))
        if key in self._eligible:
            return self._eligible[key]
        keep = None
        rels = []
        for b in chain[1:]:
            parents, ptr, rows = self.descendants(chain[0], b)
            ok = parents[np.diff(ptr) >= n_local]
            keep = ok if keep is None else np.intersect1d(keep, ok)
            rels.append((parents, ptr, rows))
        if keep is None or len(keep) == 0:
            raise ValueError(
                f"no parent at {mag_str(chain[0])}x has >= {n_local} tissue descendants at "
                f"{', '.join(mag_str(b) for b in chain[1:])}x in the training tiles")
        out = []
        for parents, ptr, rows in rels:
            pos = np.searchsorted(parents, keep)
            starts, ends = ptr[pos], ptr[pos + 1]
            new_ptr = np.zeros(len(keep) + 1, dtype=np.int64)
            np.cumsum(ends - starts, out=new_ptr[1:])
            new_rows = np.concatenate([rows[s:e] for s, e in zip(starts, ends)])
            out.append((new_ptr, new_rows))
        self._eligible[key] = (keep, out)
        return self._eligible[key]

    def donors_other_slide(self, chain: Sequence[float], n_local: int):
        """For each slide code, positions (into eligible parents) of parents on other slides."""
        key = (tuple(chain), int(n_local))
        if key not in self._other_slide:
            parents, _ = self.eligible(chain, n_local)
            codes = self.slide_code[parents]
            self._other_slide[key] = {int(s): np.flatnonzero(codes != s) for s in np.unique(codes)}
        return self._other_slide[key]

