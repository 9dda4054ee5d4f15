"""Training examples for MAD from tile tables.

Sampling is a pure function of (tile index, step rng): :func:`sample_batch` returns row
indices into the concatenated tissue-tile table, so it can be tested without pixels and
so that training is deterministic per step (no iterator state needs checkpointing).
:class:`MADBatchDataset` turns the rows of one step into augmented image tensors, reading
pixels with ``madflow.slides.SlideReader`` (one reader per slide per worker, opened lazily).

Modes (experiment key ``mode``):
  mad        one parent at a + n_local of its tissue children at b; each batch is one pair
             drawn by the ``pairs`` weights
  same_mag   teacher and student see augmented views of the same tile; tiles drawn from
             every magnification MAD sees (weight of a magnification = half the weight of
             each pair it takes part in)
  shuffled   student tiles are tissue tiles at b of a random other parent (another slide
             whenever the table has one)
  interp     student views = the parent's 1/r sub-squares (where the chosen children lie),
             upsampled to T px with bilinear interpolation
  tri        parent at the first magnification of the chain, n_local children at the second
             and n_local grandchildren at the third (e.g. 2.5 -> 10 -> 40)
With ``parent_view`` the student also sees one augmented view of the parent (last view).
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Callable, Iterable, Sequence

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from torch.utils.data import IterableDataset, get_worker_info

from madflow.slides import mag_str, pair_str

__all__ = [
    "NETWORK_MODES",
    "parse_pair",
    "TileIndex",
    "sample_batch",
    "choose_group",
    "group_weights",
    "Augmenter",
    "MADBatchDataset",
    "load_tables",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
]

NETWORK_MODES = ("mad", "same_mag", "shuffled", "interp", "tri", "supervised")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


# ---------------------------------------------------------------------------------------
# magnifications and pairs
# ---------------------------------------------------------------------------------------
def parse_pair(pair: str) -> tuple[float, ...]:
    """``"2.5->10"`` -> (2.5, 10.0); ``"2.5->10->40"`` -> (2.5, 10.0, 40.0)."""
    parts = [p.strip() for p in re.split(r"->", str(pair))]
    try:
        mags = tuple(float(p.rstrip("xX")) for p in parts)
    except ValueError:
        raise ValueError(f"bad magnification pair {pair!r} (expected e.g. '2.5->10')") from None
    if len(mags) < 2 or any(b <= a for a, b in zip(mags, mags[1:])):
        raise ValueError(f"bad magnification pair {pair!r}: needs coarse -> fine")
    return mags


def load_tables(paths: Iterable[str]) -> pd.DataFrame:
    dfs = [pd.read_parquet(p) for p in paths]
    if not dfs:
        raise ValueError("no tile tables given")
    return pd.concat(dfs, ignore_index=True)


# ---------------------------------------------------------------------------------------
# index of the hierarchy (tissue tiles only)
# ---------------------------------------------------------------------------------------
_KEY_COLS = ("k", "m")


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
        self.depth: dict[float, int] = {}
        for m in self.mags:
            sub = df[self.mag == m]
            d = 0
            for c in _KEY_COLS:
                if c in sub.columns and sub[c].notna().any():
                    d += 1
            self.depth[m] = d
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

    def _key_cols(self, depth: int) -> list[str]:
        return ["slide_id", "i", "j"] + list(_KEY_COLS[:depth])

    def descendants(self, a: float, b: float):
        """CSR relation parents(at a) -> tissue descendants(at b).

        Returns (parents [P], ptr [P+1], rows [sum]) where rows[ptr[p]:ptr[p+1]] are the
        descendants of parents[p]; only parents with at least one tissue descendant."""
        a, b = self._check_mag(a), self._check_mag(b)
        key = (a, b)
        if key in self._desc:
            return self._desc[key]
        da, db = self.depth[a], self.depth[b]
        if db <= da:
            raise ValueError(f"{mag_str(b)} is not finer than {mag_str(a)} in the tile hierarchy")
        cols = self._key_cols(da)
        pa = self.df.iloc[self._rows_by_mag[a]][cols].copy()
        pa["_prow"] = self._rows_by_mag[a]
        ch = self.df.iloc[self._rows_by_mag[b]][cols].copy()
        ch["_crow"] = self._rows_by_mag[b]
        for c in cols[1:]:
            pa[c] = pa[c].astype("int64")
            ch[c] = ch[c].astype("int64")
        mrg = pa.merge(ch, on=cols, how="inner")
        mrg = mrg.sort_values(["_prow", "_crow"], kind="stable")
        prow = mrg["_prow"].to_numpy(np.int64)
        crow = mrg["_crow"].to_numpy(np.int64)
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


# ---------------------------------------------------------------------------------------
# sampling (pure functions of index + rng)
# ---------------------------------------------------------------------------------------
def group_weights(mode: str, pairs: dict, chain: Sequence[float] | None = None) -> dict:
    """The batch groups of a mode and their weights: pair labels for mad/shuffled/interp,
    magnifications (as strings) for same_mag, the chain label for tri."""
    if not pairs:
        raise ValueError("no training pairs configured")
    w = {str(k): float(v) for k, v in pairs.items() if float(v) > 0}
    for k in w:
        parse_pair(k)
    if mode in ("mad", "shuffled", "interp"):
        return w
    if mode in ("same_mag", "supervised"):
        out: dict = {}
        for k, v in w.items():
            ms = parse_pair(k)
            for m in ms:
                out[mag_str(m)] = out.get(mag_str(m), 0.0) + v / len(ms)
        return out
    if mode == "tri":
        if chain is None:
            mags = sorted({m for k in w for m in parse_pair(k)})
            chain = mags
        if len(chain) != 3:
            raise ValueError(f"tri mode needs a chain of 3 magnifications, got {list(chain)}")
        return {pair_str(*chain): 1.0}
    raise ValueError(f"unknown training mode {mode!r}")


def choose_group(groups: dict, rng: np.random.Generator) -> str:
    names = sorted(groups)  # stable order regardless of dict order
    p = np.array([groups[n] for n in names], dtype=np.float64)
    p = p / p.sum()
    return names[int(rng.choice(len(names), p=p))]


def _choose(rng: np.random.Generator, n: int, size: int) -> np.ndarray:
    return rng.choice(n, size=size, replace=size > n)


def sample_batch(index: TileIndex, mode: str, group: str, n_parents: int, n_local: int,
                 rng: np.random.Generator) -> dict:
    """Row indices (into ``index.df``) of one batch.

    Returns ``{"mode", "group", "parents": [B], "children": [B, V], "interp": bool}`` where
    ``children`` are the rows the student views come from (for ``interp``: the children
    whose footprint defines the crop of the parent; for ``same_mag``: the parent itself).
    ``supervised`` (the positive control): ``n_parents * (n_local + 1)`` labelled tiles at
    magnification ``group`` in ``parents`` and no children.
    """
    B = int(n_parents)
    if mode == "supervised":  # labelled tiles, as many images per step as a MAD batch has
        rows = index.labelled_rows(float(group))
        tiles = rows[_choose(rng, len(rows), B * (n_local + 1))]
        return {"mode": mode, "group": group, "parents": tiles,
                "children": np.empty((len(tiles), 0), dtype=np.int64), "interp": False}
    if mode == "same_mag":
        rows = index.rows_at(float(group))
        parents = rows[_choose(rng, len(rows), B)]
        children = np.repeat(parents[:, None], n_local, axis=1)
        return {"mode": mode, "group": group, "parents": parents, "children": children, "interp": False}

    chain = parse_pair(group)
    if mode == "tri":
        if len(chain) != 3:
            raise ValueError(f"tri mode needs a 3-magnification chain, got {group!r}")
    elif len(chain) != 2:
        raise ValueError(f"mode {mode} needs a pair a->b, got {group!r}")
    elig, rels = index.eligible(chain, n_local)
    pos = _choose(rng, len(elig), B)
    parents = elig[pos]

    if mode == "shuffled":
        donors_by_slide = index.donors_other_slide(chain, n_local)
        donor_pos = np.empty(B, dtype=np.int64)
        for b in range(B):
            cand = donors_by_slide.get(int(index.slide_code[parents[b]]))
            if cand is not None and len(cand):
                donor_pos[b] = cand[rng.integers(len(cand))]
            elif len(elig) > 1:  # single slide: any other parent
                d = int(rng.integers(len(elig) - 1))
                donor_pos[b] = d + (d >= pos[b])
            else:
                donor_pos[b] = pos[b]
        src = donor_pos
    else:
        src = pos

    views = []
    for ptr, rows in rels:
        sel = np.empty((B, n_local), dtype=np.int64)
        for b in range(B):
            s, e = ptr[src[b]], ptr[src[b] + 1]
            sel[b] = rows[s + rng.choice(e - s, size=n_local, replace=False)]
        views.append(sel)
    children = np.concatenate(views, axis=1)
    return {"mode": mode, "group": group, "parents": parents, "children": children,
            "interp": mode == "interp"}


# ---------------------------------------------------------------------------------------
# pixels
# ---------------------------------------------------------------------------------------
def interp_views(parent_px: torch.Tensor, parent_rows: pd.DataFrame, child_rows: pd.DataFrame,
                 size: int) -> torch.Tensor:
    """Crop each parent tile at the sub-square covered by the corresponding child and
    upsample it to ``size`` px (bilinear). parent_px: float [N, 3, T, T]; rows aligned."""
    T = parent_px.shape[-1]
    out = torch.empty(parent_px.shape[0], 3, size, size, dtype=parent_px.dtype)
    px0 = parent_rows["x0"].to_numpy(np.int64)
    py0 = parent_rows["y0"].to_numpy(np.int64)
    ps0 = parent_rows["size0"].to_numpy(np.float64)
    cx0 = child_rows["x0"].to_numpy(np.int64)
    cy0 = child_rows["y0"].to_numpy(np.int64)
    cs0 = child_rows["size0"].to_numpy(np.float64)
    for n in range(parent_px.shape[0]):
        scale = T / ps0[n]  # parent px per level-0 px
        x0 = int(round((cx0[n] - px0[n]) * scale))
        y0 = int(round((cy0[n] - py0[n]) * scale))
        s = max(1, int(round(cs0[n] * scale)))
        crop = parent_px[n:n + 1, :, y0:y0 + s, x0:x0 + s]
        out[n] = F.interpolate(crop, size=(size, size), mode="bilinear", align_corners=False)[0]
    return out


# HED colour deconvolution (Ruifrok & Johnston, as in scikit-image)
_RGB_FROM_HED = np.array([[0.65, 0.70, 0.29], [0.07, 0.99, 0.11], [0.27, 0.57, 0.78]])
_RGB_FROM_HED[2, :] = np.cross(_RGB_FROM_HED[0, :], _RGB_FROM_HED[1, :])
_HED_FROM_RGB = np.linalg.inv(_RGB_FROM_HED)


@dataclass
class Augmenter:
    """Native-resolution augmentations (no resized crops): flips, 90-degree rotations,
    HED stain jitter, brightness/contrast/saturation jitter, light Gaussian blur, then
    ImageNet normalisation. All randomness comes from the numpy ``rng`` passed in.

    Batched implementation (one pass per operation over the whole batch, in place on a
    private copy; the input tensor is never modified): the HED jitter
    ``exp(-(((-log x) @ H) * a + b) @ R)`` is one per-image 3x3 colour matrix
    ``M = H diag(a) R`` and offset ``c = b R`` applied with one batched matmul,
    ``exp(log(x) @ M - c)``; the blur convolves only the views drawn for it, in one
    grouped convolution."""

    hed_jitter: float = 0.05
    color_jitter: float = 0.1
    blur_prob: float = 0.1
    blur_sigma: tuple = (0.1, 1.0)
    enabled: bool = True
    tile_norm: bool = False
    mean: tuple = IMAGENET_MEAN
    std: tuple = IMAGENET_STD
    _hed: torch.Tensor = field(default=None, init=False, repr=False)
    _rgb: torch.Tensor = field(default=None, init=False, repr=False)
    _consts: dict = field(default_factory=dict, init=False, repr=False, compare=False)

    def __post_init__(self):
        self._hed = torch.tensor(_HED_FROM_RGB, dtype=torch.float32)
        self._rgb = torch.tensor(_RGB_FROM_HED, dtype=torch.float32)

    def _mean_std(self, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        key = (dtype, tuple(self.mean), tuple(self.std))
        ms = self._consts.get(key)
        if ms is None:
            ms = self._consts[key] = (torch.tensor(self.mean, dtype=dtype).view(1, 3, 1, 1),
                                      torch.tensor(self.std, dtype=dtype).view(1, 3, 1, 1))
        return ms

    def normalise(self, x: torch.Tensor) -> torch.Tensor:
        if self.tile_norm:
            return tile_standardise(x)
        mean, std = self._mean_std(x.dtype)
        return (x - mean) / std

    @staticmethod
    def _geometry(x: torch.Tensor, flip_h, flip_v, rot) -> torch.Tensor:
        """Per-view flip (W), flip (H), then rot90 by ``rot`` quarter turns; a new tensor.
        Views with the same (flip_h, flip_v, rot) are transformed together."""
        out = torch.empty_like(x, memory_format=torch.contiguous_format)
        code = flip_h.astype(np.int64) * 8 + flip_v.astype(np.int64) * 4 + rot.astype(np.int64)
        for c in np.unique(code):
            sel = np.flatnonzero(code == c)
            fh, fv, r = bool(c & 8), bool(c & 4), int(c & 3)
            whole = len(sel) == x.shape[0]
            t = x if whole else x[torch.from_numpy(sel)]
            if fh and fv:
                t = t.flip(-2, -1)
            elif fh:
                t = t.flip(-1)
            elif fv:
                t = t.flip(-2)
            if r:
                t = torch.rot90(t, r, dims=(-2, -1))
            if whole:
                out.copy_(t)
            else:
                out[torch.from_numpy(sel)] = t
        return out

    def __call__(self, x: torch.Tensor, rng: np.random.Generator) -> torch.Tensor:
        """x: float [N, 3, T, T] in [0, 1] -> augmented and normalised."""
        if not self.enabled:
            return self.normalise(x)
        N = x.shape[0]
        flip_h = rng.random(N) < 0.5
        flip_v = rng.random(N) < 0.5
        rot = rng.integers(0, 4, size=N)
        hed_a = rng.uniform(1 - self.hed_jitter, 1 + self.hed_jitter, size=(N, 3))
        hed_b = rng.uniform(-self.hed_jitter, self.hed_jitter, size=(N, 3))
        cj = self.color_jitter
        bri = rng.uniform(1 - cj, 1 + cj, size=N)
        con = rng.uniform(1 - cj, 1 + cj, size=N)
        sat = rng.uniform(1 - cj, 1 + cj, size=N)
        blur = rng.random(N) < self.blur_prob
        sig = rng.uniform(self.blur_sigma[0], self.blur_sigma[1], size=N)
        if N == 0:
            return self.normalise(x)

        # geometry (exact pixel permutations); x is now our own contiguous copy
        x = self._geometry(x, flip_h, flip_v, rot)
        dt = x.dtype
        H, W = x.shape[-2:]
        flat = x.view(N, 3, H * W)

        # HED stain jitter in optical density space, as one colour matrix per view
        if self.hed_jitter > 0:
            # od' = ((od @ Hm) * a + b) @ R = od @ (Hm diag(a) R) + b @ R, od = -log x
            M = np.einsum("cd,nd,de->nce", _HED_FROM_RGB, hed_a, _RGB_FROM_HED)   # [N, in, out]
            c = hed_b @ _RGB_FROM_HED                                             # [N, out]
            Mt = torch.as_tensor(M.transpose(0, 2, 1), dtype=dt).contiguous()     # [N, out, in]
            negc = torch.as_tensor(-c, dtype=dt).view(N, 3, 1).expand(N, 3, H * W)
            flat.clamp_(1.0 / 255.0, 1.0).log_()
            flat = torch.baddbmm(negc, Mt, flat)   # log of the jittered image
            flat.exp_().clamp_(0.0, 1.0)

        # brightness / contrast / saturation
        if cj > 0:
            w = torch.tensor([[0.299, 0.587, 0.114]], dtype=dt)
            bri_t = torch.as_tensor(bri, dtype=dt).view(N, 1, 1)
            con_t = torch.as_tensor(con, dtype=dt).view(N, 1, 1)
            sat_t = torch.as_tensor(sat, dtype=dt).view(N, 1, 1)
            flat.mul_(bri_t).clamp_(0.0, 1.0)
            gray = torch.matmul(w, flat)                                   # [N, 1, HW]
            m = gray.mean(dim=2, keepdim=True)                             # [N, 1, 1]
            # m + (x - m) * con
            flat.mul_(con_t).add_(m * (1 - con_t)).clamp_(0.0, 1.0)
            gray = torch.matmul(w, flat)
            # gray + (x - gray) * sat
            flat.mul_(sat_t).add_(gray * (1 - sat_t)).clamp_(0.0, 1.0)
        x = flat.view(N, 3, H, W)

        # light blur on a few views: one grouped 3x3 convolution over those views only
        sel = np.flatnonzero(blur)
        if len(sel):
            s = sig[sel].astype(np.float64)
            r = np.arange(-1, 2, dtype=np.float64)
            k1 = np.exp(-(r[None, :] ** 2) / (2 * s[:, None] ** 2))
            k1 /= k1.sum(axis=1, keepdims=True)
            k2 = torch.as_tensor(k1[:, :, None] * k1[:, None, :], dtype=dt)      # [n, 3, 3]
            k2 = k2.repeat_interleave(3, dim=0).unsqueeze(1)                     # [3n, 1, 3, 3]
            idx = torch.from_numpy(sel)
            t = F.pad(x[idx].reshape(1, 3 * len(sel), H, W), (1, 1, 1, 1), mode="reflect")
            x[idx] = F.conv2d(t, k2, groups=3 * len(sel)).view(len(sel), 3, H, W)

        if self.tile_norm:
            return tile_standardise(x)
        mean, std = self._mean_std(dt)
        return x.sub_(mean).div_(std)


def tile_standardise(x: torch.Tensor) -> torch.Tensor:
    """Per-tile, per-channel standardisation of [N, 3, T, T] images: removes each tile's
    colour mean and spread (slide stain, and the colour-statistics shortcut), leaving
    structure. The same function serves training and embedding (encoder meta `tile_norm`)."""
    mean = x.mean(dim=(-2, -1), keepdim=True)
    std = x.std(dim=(-2, -1), keepdim=True).clamp_min(1e-2)
    return (x - mean) / std


def _default_reader_factory(path: str):
    from madflow.slides import SlideReader

    return SlideReader(path)


class MADBatchDataset(IterableDataset):
    """Yields one ready batch per training step for steps ``start_step .. total_steps-1``.

    Batch of step s on rank r is a pure function of (seed, s, r): the group (pair) is drawn
    from ``rng(seed, s)`` (the same on every rank), rows from ``rng(seed, s, r, 0)`` and
    augmentations from ``rng(seed, s, r, 1)``. With several DataLoader workers, worker w
    produces the steps with ``(s - start_step) % n_workers == w``; the DataLoader returns
    them in step order. Use with ``DataLoader(ds, batch_size=None)``.

    Each item: ``{"step", "group", "teacher": [B,3,T,T], "student": [B,V,3,T,T],
    "parents": [B], "children": [B, n]}`` (rows into ``index.df``).
    """

    def __init__(self, index: TileIndex, mode: str, pairs: dict, n_parents: int, n_local: int,
                 seed: int, total_steps: int, start_step: int = 0, rank: int = 0,
                 parent_view: bool = True, augmenter: Augmenter | None = None,
                 reader_factory: Callable[[str], object] | None = None,
                 same_mag_weight: Sequence[float] | None = None):
        super().__init__()
        if mode not in NETWORK_MODES:
            raise ValueError(f"mode {mode!r} does not train a network (expected one of {NETWORK_MODES})")
        self.index = index
        self.mode = mode
        self.groups = group_weights(mode, pairs)
        # cross-scale modes: per step, the probability of a same-magnification (plain DINO)
        # batch instead of a cross-scale one; None or all zero = cross-scale batches only
        w = None if same_mag_weight is None else np.asarray(same_mag_weight, dtype=np.float64)
        self.same_mag_weight = w if mode not in ("same_mag", "supervised") and w is not None and w.any() else None
        self.same_mag_groups = group_weights("same_mag", pairs) if self.same_mag_weight is not None else {}
        for g in self.groups:  # fail early on pairs the tables cannot serve
            if mode == "same_mag":
                index.rows_at(float(g))
            elif mode == "supervised":
                if not len(index.labelled_rows(float(g))):
                    raise ValueError(f"the supervised control needs labelled tiles at {g}x "
                                     f"(label purity >= {index.min_purity}); the tile tables have none")
            else:
                index.eligible(parse_pair(g), n_local)
        for g in self.same_mag_groups:
            index.rows_at(float(g))
        self.n_parents = int(n_parents)
        self.n_local = int(n_local)
        self.seed = int(seed)
        self.total_steps = int(total_steps)
        self.start_step = int(start_step)
        self.rank = int(rank)
        self.parent_view = bool(parent_view)
        self.augmenter = augmenter if augmenter is not None else Augmenter()
        self.reader_factory = reader_factory or _default_reader_factory
        self._readers: dict = {}
        self.tile_px = index.tile_px

    # -- rng streams --------------------------------------------------------------------
    def group_for_step(self, step: int) -> tuple[str, str]:
        """(mode, group) of a step's batch: a pure function of (seed, step)."""
        rng = np.random.default_rng([self.seed, int(step), 7919])
        if self.same_mag_weight is not None:
            w = self.same_mag_weight[min(int(step), len(self.same_mag_weight) - 1)]
            if rng.random() < w:
                return "same_mag", choose_group(self.same_mag_groups, rng)
        return self.mode, choose_group(self.groups, rng)

    def rows_for_step(self, step: int) -> dict:
        mode, group = self.group_for_step(step)
        rng = np.random.default_rng([self.seed, int(step), self.rank, 0])
        return sample_batch(self.index, mode, group, self.n_parents, self.n_local, rng)

    # -- pixels -------------------------------------------------------------------------
    def _reader(self, path: str):
        r = self._readers.get(path)
        if r is None:
            r = self._readers[path] = self.reader_factory(path)
        return r

    def read_rows(self, rows: np.ndarray) -> torch.Tensor:
        """uint8 pixels of ``rows`` (any shape) -> float [*rows.shape, 3, T, T] in [0, 1]."""
        flat = np.asarray(rows, dtype=np.int64).ravel()
        uniq, inv = np.unique(flat, return_inverse=True)
        sub = self.index.df.iloc[uniq]
        T = self.tile_px
        px = np.empty((len(uniq), T, T, 3), dtype=np.uint8)
        paths = sub["path"].astype(str).to_numpy()
        for path in pd.unique(paths):
            sel = np.flatnonzero(paths == path)
            imgs = np.asarray(self._reader(path).read_tiles(sub.iloc[sel]))
            if imgs.shape != (len(sel), T, T, 3):
                raise ValueError(f"reader returned {imgs.shape} for {len(sel)} tiles of {T} px from {path}")
            px[sel] = imgs
        t = torch.from_numpy(px).permute(0, 3, 1, 2).float().div_(255.0)
        t = t[torch.from_numpy(inv.reshape(-1))]
        return t.reshape(*np.shape(rows), 3, T, T)

    def raw_views(self, rows: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """Un-augmented teacher [B,3,T,T] and student [B,V,3,T,T] images in [0, 1]."""
        parents, children = rows["parents"], rows["children"]
        B, n = children.shape
        T = self.tile_px
        teacher = self.read_rows(parents)
        if rows["interp"]:
            prow = self.index.df.iloc[np.repeat(parents, n)]
            crow = self.index.df.iloc[children.ravel()]
            ppx = teacher.repeat_interleave(n, dim=0)
            student = interp_views(ppx, prow, crow, T).reshape(B, n, 3, T, T)
        elif rows["mode"] == "same_mag":
            student = teacher.unsqueeze(1).expand(B, n, 3, T, T).clone()
        else:
            student = self.read_rows(children)
        if self.parent_view:
            student = torch.cat([student, teacher.unsqueeze(1)], dim=1)
        return teacher, student

    def batch_for_step(self, step: int) -> dict:
        rows = self.rows_for_step(step)
        teacher, student = self.raw_views(rows)
        B, V = student.shape[:2]
        T = self.tile_px
        arng = np.random.default_rng([self.seed, int(step), self.rank, 1])
        allv = self.augmenter(torch.cat([teacher, student.reshape(B * V, 3, T, T)]), arng)
        return {
            "step": int(step),
            "group": rows["group"],
            "teacher": allv[:B].contiguous(),
            "student": allv[B:].reshape(B, V, 3, T, T).contiguous(),
            "parents": torch.from_numpy(rows["parents"]),
            "children": torch.from_numpy(rows["children"]),
        }

    def __iter__(self):
        wi = get_worker_info()
        wid, nw = (wi.id, wi.num_workers) if wi is not None else (0, 1)
        for step in range(self.start_step + wid, self.total_steps, nw):
            yield self.batch_for_step(step)

    def __len__(self):
        return max(0, self.total_steps - self.start_step)
