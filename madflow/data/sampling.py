"""Which tiles one training batch holds: pure functions of (tile index, mode, rng).

A batch is row indices into ``TileIndex.df``, so sampling is testable without pixels and a
step's batch is a function of (seed, step, rank) alone (nothing to checkpoint). Each mode's
``groups`` (madflow.modes) says how batches are grouped, its ``sampler`` which rows they hold:

  aligned    one parent at a + n_local of its tissue descendants at each finer magnification
  shuffled   the descendants of a random other parent (another slide whenever there is one)
  same_tile  the tile itself at every view (two augmented views of one tile)
  labelled   n_parents * (n_local + 1) labelled tiles at one magnification, no children
  pooled     n_parents tiles, each at a magnification drawn uniformly among the pairs' ones
"""

from __future__ import annotations

import re
from typing import Sequence

import numpy as np

from madflow.data.index import TileIndex
from madflow.modes import Mode, get_mode
from madflow.slides import mag_str, pair_str


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


def group_weights(mode: Mode | str, pairs: dict, chain: Sequence[float] | None = None) -> dict:
    """The batch groups of a mode and their weights: pair labels ("pairs"), magnifications
    as strings, each weighted by half of every pair it takes part in ("mags"), or the one
    chain label ("chain")."""
    mode = mode if isinstance(mode, Mode) else get_mode(mode)
    if not pairs:
        raise ValueError("no training pairs configured")
    weights = {str(k): float(v) for k, v in pairs.items() if float(v) > 0}
    for pair in weights:
        parse_pair(pair)
    if mode.groups == "pairs":
        return weights
    if mode.groups == "mags":
        out: dict = {}
        for pair, weight in weights.items():
            mags = parse_pair(pair)
            for m in mags:
                out[mag_str(m)] = out.get(mag_str(m), 0.0) + weight / len(mags)
        return out
    if mode.groups == "pooled":
        return {"+".join(sorted(group_weights("same_mag", pairs), key=float)): 1.0}
    if mode.groups == "chain":
        if chain is None:
            chain = sorted({m for pair in weights for m in parse_pair(pair)})
        if len(chain) != 3:
            raise ValueError(f"{mode.name} mode needs a chain of 3 magnifications, got {list(chain)}")
        return {pair_str(*chain): 1.0}
    raise ValueError(f"mode {mode.name!r} does not sample training batches")


def choose_group(groups: dict, rng: np.random.Generator) -> str:
    names = sorted(groups)  # stable order regardless of dict order
    p = np.array([groups[n] for n in names], dtype=np.float64)
    p = p / p.sum()
    return names[int(rng.choice(len(names), p=p))]


def _choose(rng: np.random.Generator, n: int, size: int) -> np.ndarray:
    return rng.choice(n, size=size, replace=size > n)


def _labelled(index: TileIndex, group: str, n_parents: int, n_local: int, rng) -> tuple:
    """As many labelled tiles as a MAD batch has images, in ``parents``; no children."""
    rows = index.labelled_rows(float(group))
    tiles = rows[_choose(rng, len(rows), n_parents * (n_local + 1))]
    return tiles, np.empty((len(tiles), 0), dtype=np.int64)


def _same_tile(index: TileIndex, group: str, n_parents: int, n_local: int, rng) -> tuple:
    rows = index.rows_at(float(group))
    parents = rows[_choose(rng, len(rows), n_parents)]
    return parents, np.repeat(parents[:, None], n_local, axis=1)


def _pooled(index: TileIndex, group: str, n_parents: int, n_local: int, rng) -> tuple:
    """Tiles of every magnification of ``group`` ("2.5+10+40"), mixed in one batch: each
    tile's magnification drawn uniformly, then the tile uniformly at it."""
    mags = [float(m) for m in group.split("+")]
    which = rng.integers(len(mags), size=n_parents)
    tiles = np.empty(n_parents, dtype=np.int64)
    for k, m in enumerate(mags):
        sel = np.flatnonzero(which == k)
        rows = index.rows_at(m)
        tiles[sel] = rows[_choose(rng, len(rows), len(sel))]
    return tiles, np.empty((n_parents, 0), dtype=np.int64)


def _chain(group: str, sampler: str) -> tuple[float, ...]:
    chain = parse_pair(group)
    if len(chain) not in (2, 3):
        raise ValueError(f"sampler {sampler} needs a pair a->b or a chain a->b->c, got {group!r}")
    return chain


def _descendants_of(rels, src: np.ndarray, n_local: int, rng) -> np.ndarray:
    """n_local descendants (without replacement) of each source parent, per finer magnification."""
    views = []
    for ptr, rows in rels:
        sel = np.empty((len(src), n_local), dtype=np.int64)
        for b in range(len(src)):
            start, end = ptr[src[b]], ptr[src[b] + 1]
            sel[b] = rows[start + rng.choice(end - start, size=n_local, replace=False)]
        views.append(sel)
    return np.concatenate(views, axis=1)


def _aligned(index: TileIndex, group: str, n_parents: int, n_local: int, rng) -> tuple:
    chain = _chain(group, "aligned")
    eligible, rels = index.eligible(chain, n_local)
    pos = _choose(rng, len(eligible), n_parents)
    return eligible[pos], _descendants_of(rels, pos, n_local, rng)


def _shuffled(index: TileIndex, group: str, n_parents: int, n_local: int, rng) -> tuple:
    chain = _chain(group, "shuffled")
    eligible, rels = index.eligible(chain, n_local)
    pos = _choose(rng, len(eligible), n_parents)
    parents = eligible[pos]
    donors_by_slide = index.donors_other_slide(chain, n_local)
    donor_pos = np.empty(n_parents, dtype=np.int64)
    for b in range(n_parents):
        candidates = donors_by_slide.get(int(index.slide_code[parents[b]]))
        if candidates is not None and len(candidates):
            donor_pos[b] = candidates[rng.integers(len(candidates))]
        elif len(eligible) > 1:  # single slide: any other parent
            d = int(rng.integers(len(eligible) - 1))
            donor_pos[b] = d + (d >= pos[b])
        else:
            donor_pos[b] = pos[b]
    return parents, _descendants_of(rels, donor_pos, n_local, rng)


SAMPLERS = {"aligned": _aligned, "shuffled": _shuffled, "same_tile": _same_tile, "labelled": _labelled,
            "pooled": _pooled}


def sample_batch(index: TileIndex, mode: Mode | str, group: str, n_parents: int, n_local: int,
                 rng: np.random.Generator) -> dict:
    """Row indices (into ``index.df``) of one batch.

    Returns ``{"mode", "group", "parents": [B], "children": [B, V]}`` where ``children`` are
    the rows the student views come from (for a mode whose student sees parent crops: the
    children whose footprint defines the crop; for same_tile: the parent itself).
    """
    mode = mode if isinstance(mode, Mode) else get_mode(mode)
    if mode.sampler not in SAMPLERS:
        raise ValueError(f"mode {mode.name!r} does not sample training batches")
    if mode.groups == "chain" and len(parse_pair(group)) != 3:
        raise ValueError(f"{mode.name} mode needs a 3-magnification chain, got {group!r}")
    if mode.groups == "pairs" and len(parse_pair(group)) != 2:
        raise ValueError(f"mode {mode.name} needs a pair a->b, got {group!r}")
    parents, children = SAMPLERS[mode.sampler](index, group, int(n_parents), int(n_local), rng)
    return {"mode": mode.name, "group": group, "parents": parents, "children": children}
