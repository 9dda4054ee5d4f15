"""Open whole-slide images, resolve their magnification, read tiles at native pyramid levels.

Pixels come from the stored pyramid level itself: level-0 coordinates map to a level by
integer division by its nominal downsample, never through OpenSlide's sub-pixel
interpolation (measured: up to ~70 grey levels off). TIFF-based slides (.svs, .tif, .ndpi, ...)
are decoded tile by tile with tifffile/imagecodecs behind a small LRU cache of decoded
tiles, which is what makes grid-order reads fast; other formats (.mrxs, ...) fall back to
OpenSlide `read_region` at the level.
"""

from __future__ import annotations

import os
import re
from collections import OrderedDict
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

import imagecodecs
import numpy as np
import openslide
from PIL import Image

NATIVE_TOLERANCE = 0.01  # a level is native for a magnification within 1% of the factor
# objective magnifications scanners are built for; a magnification measured from an MPP
# (10 / mpp) is snapped to the nearest one within SNAP_TOLERANCE (scanners write 0.2527,
# 0.263 or 0.2428 um/px at 40x, never 0.25)
NOMINAL_MAGS = (5.0, 10.0, 20.0, 40.0, 60.0, 80.0)
SNAP_TOLERANCE = 0.15
# mpp-x and mpp-y further apart than this: the pixels are not square (an error, docs/slides.md)
ANISOTROPY_TOLERANCE = 0.02
BACKGROUND = 255  # padding outside the slide: white, like glass
# decode buffers left by closed readers, by shape (at most one cache's worth each): the next
# reader decodes into pages already mapped; first-touch page faults on fresh buffers were
# ~15% of the read time in bench/bench_reader.py's 40x case
_SPARE_BUFFERS: dict[tuple, list[np.ndarray]] = {}


class SlideError(Exception):
    """A slide that cannot be used, with the slide named in the message."""


def mag_str(mag: float) -> str:
    """2.5 -> '2.5', 10.0 -> '10' (the form used in scopes, column and file names)."""
    return f"{float(mag):g}"


def pair_str(*mags: float) -> str:
    """(2.5, 10) -> '2.5->10': the scope of a magnification pair (or chain)."""
    return "->".join(mag_str(m) for m in mags)


def mpp_to_mag(mpp: float) -> float:
    """40x = 0.25 um/px, 20x = 0.5, 10x = 1.0 (docs/slides.md)."""
    return 10.0 / mpp


def level_read_size(size0: int, downsample: float) -> tuple[int, int]:
    """(step, n): a footprint of `size0` level-0 px is read as n x n pixels of a level whose
    nominal integer downsample is `step` (level-0 x maps to x // step of the level)."""
    step = max(1, round(downsample))
    return step, max(1, round(size0 / step))


def level_read_sizes(table) -> tuple[np.ndarray, np.ndarray]:
    """level_read_size for every row of a tile table (columns size0, downsample), computed once
    per distinct footprint: a table has one per magnification."""
    step, n = np.empty(len(table), np.int64), np.empty(len(table), np.int64)
    for (size0, downsample), idx in table.groupby(["size0", "downsample"]).indices.items():
        step[idx], n[idx] = level_read_size(int(size0), float(downsample))
    return step, n


@dataclass(frozen=True)
class LevelChoice:
    """Where to read a target magnification from: level, its downsample, native or resized."""

    level: int
    downsample: float
    native: bool


def choose_levels(
    level_downsamples, base_mag: float, mags, tol: float = NATIVE_TOLERANCE
) -> dict[float, LevelChoice | None]:
    """Per target magnification: the native level (downsample within `tol` of base/mag),
    else the nearest finer level (to be area-resized); None when mag is finer than base
    (never invented)."""
    plan: dict[float, LevelChoice | None] = {}
    for mag in mags:
        factor = base_mag / mag
        if factor < 1 - tol:
            plan[mag] = None
            continue
        native = [
            (abs(d - factor) / factor, lvl)
            for lvl, d in enumerate(level_downsamples)
            if abs(d - factor) / factor <= tol
        ]
        if native:
            lvl = min(native)[1]
            plan[mag] = LevelChoice(lvl, float(level_downsamples[lvl]), True)
            continue
        finer = [(d, lvl) for lvl, d in enumerate(level_downsamples) if d <= factor * (1 + tol)]
        d, lvl = max(finer)
        plan[mag] = LevelChoice(lvl, float(d), False)
    return plan


def footprint_size(tile_px: int, base_mag: float, mag: float) -> int:
    """Level-0 side of a tile of `tile_px` at `mag`: T * base / mag, required to be an integer
    so that the hierarchy stays exact."""
    size = Fraction(tile_px) * Fraction(base_mag).limit_denominator(1000) / Fraction(
        mag
    ).limit_denominator(1000)
    if size.denominator != 1:
        raise ValueError(
            f"tile_px={tile_px} at {mag_str(mag)}x on a {mag_str(base_mag)}x slide covers "
            f"{float(size)} level-0 px, not an integer: choose tile_px so that "
            "tile_px * base / mag is whole"
        )
    return int(size)


def snap_magnification(mpp: float) -> float:
    """The nominal magnification (NOMINAL_MAGS) of a measured pixel size: 10 / mpp snapped to
    the nearest nominal value within SNAP_TOLERANCE; SlideError beyond it."""
    measured = mpp_to_mag(mpp)
    nominal = min(NOMINAL_MAGS, key=lambda m: abs(measured - m) / m)
    if abs(measured - nominal) / nominal > SNAP_TOLERANCE:
        raise SlideError(
            f"mpp {mpp:g} um/px gives {measured:.2f}x, not within {SNAP_TOLERANCE:.0%} of a "
            f"nominal magnification ({', '.join(mag_str(m) + 'x' for m in NOMINAL_MAGS)}); "
            "set objective_power in the slide's manifest row"
        )
    return nominal


def parse_objective_power(value, column: str = "objective_power") -> float | None:
    """A manifest override of the objective power: '' -> None; 20, 20x, 20X, 2.5x -> float.
    Anything else is a SlideError quoting the value and naming the column (a slide's own
    metadata must never win silently over an override the user meant to give)."""
    text = str(value or "").strip()
    if not text:
        return None
    match = re.fullmatch(r"(\d+(?:\.\d+)?)\s*[xX]?", text)
    power = float(match.group(1)) if match else 0.0
    if power <= 0:
        raise SlideError(
            f"{column} {text!r} cannot be parsed: write the objective power as a number, "
            "optionally followed by x (e.g. 20, 20x, 40X)"
        )
    return power


def parse_mpp(value, column: str = "mpp") -> float | None:
    """A manifest override of the level-0 pixel size in um/px: '' -> None, else a positive
    number with a decimal point; anything else (0,25; 0.25um) is a SlideError quoting it."""
    text = str(value or "").strip()
    if not text:
        return None
    mpp = _as_float(text)
    if mpp is None:
        hint = " (use a decimal point, not a comma)" if "," in text else ""
        raise SlideError(f"{column} {text!r} cannot be parsed as a pixel size in um/px{hint}")
    return mpp


def resolve_base_mag(props, objective_power=None, mpp=None) -> tuple[float, float | None, str]:
    """Base magnification, first found of (docs/slides.md): the manifest row's
    `objective_power`, its `mpp` (users fill these to correct wrong metadata, so they win),
    the slide's openslide.objective-power, its openslide.mpp-x. An MPP is snapped to the
    nominal magnification (`snap_magnification`). Returns (base_mag, mpp, source): mpp is the
    measured pixel size (manifest's, else the slide's; None if neither), source names the
    field that gave base_mag.

    Metadata that disagrees is a SlideError naming both values, never a silent pick: the
    row's objective_power vs its mpp, and, where the row corrects neither, the slide's
    non-square pixels (mpp-x vs mpp-y beyond ANISOTROPY_TOLERANCE) and its objective power
    vs its MPP (beyond SNAP_TOLERANCE)."""
    row_power, row_mpp = parse_objective_power(objective_power), parse_mpp(mpp)
    if row_power and row_mpp:
        _check_agree(row_power, row_mpp, "the manifest row's objective_power", "its mpp", "correct one of them")
        return row_power, row_mpp, "manifest objective_power"
    if row_power or row_mpp:
        measured_mpp = row_mpp or _as_float(props.get(openslide.PROPERTY_NAME_MPP_X))
        if row_power:
            return row_power, measured_mpp, "manifest objective_power"
        return snap_magnification(row_mpp), row_mpp, "manifest mpp"
    slide_power = _as_float(props.get(openslide.PROPERTY_NAME_OBJECTIVE_POWER))
    slide_mpp = _as_float(props.get(openslide.PROPERTY_NAME_MPP_X))
    slide_mpp_y = _as_float(props.get(openslide.PROPERTY_NAME_MPP_Y))
    override = "fill objective_power or mpp in the slide's manifest row to say which is right"
    if slide_mpp and slide_mpp_y and abs(slide_mpp - slide_mpp_y) / min(slide_mpp, slide_mpp_y) > ANISOTROPY_TOLERANCE:
        raise SlideError(
            f"pixels are not square: openslide.mpp-x {slide_mpp:g} vs openslide.mpp-y {slide_mpp_y:g} "
            f"um/px (more than {ANISOTROPY_TOLERANCE:.0%} apart), so no single magnification fits "
            f"the slide; if the metadata is wrong, {override}"
        )
    if slide_power and slide_mpp:
        _check_agree(slide_power, slide_mpp, "openslide.objective-power", "openslide.mpp-x", override)
    if slide_power:
        return slide_power, slide_mpp, "objective-power"
    if slide_mpp:
        return snap_magnification(slide_mpp), slide_mpp, "mpp"
    raise SlideError(
        "no magnification information: the slide has neither openslide.objective-power nor "
        "openslide.mpp-x; add an objective_power or mpp column to its manifest row"
    )


def _check_agree(power: float, mpp: float, power_name: str, mpp_name: str, fix: str) -> None:
    """An objective power and an MPP must give the same magnification within SNAP_TOLERANCE
    (a 20x scan labelled AppMag 40 has MPP 0.5: 20x, not 40x)."""
    measured = mpp_to_mag(mpp)
    if abs(measured - power) / power > SNAP_TOLERANCE:
        raise SlideError(
            f"{power_name} {power:g} and {mpp_name} {mpp:g} um/px ({measured:.1f}x) disagree by more "
            f"than {SNAP_TOLERANCE:.0%}: {fix}"
        )


def _as_float(value) -> float | None:
    try:
        out = float(value)
    except (TypeError, ValueError):
        return None
    return out if np.isfinite(out) and out > 0 else None


def open_slide(path) -> openslide.OpenSlide:
    """OpenSlide handle with errors that name the file and the cause."""
    path = Path(path)
    if not path.exists():
        raise SlideError(f"{path}: file not found")
    if not path.is_file():
        raise SlideError(f"{path}: is a directory or special file, not a slide file")
    try:
        return openslide.OpenSlide(str(path))
    except openslide.OpenSlideUnsupportedFormatError:
        raise SlideError(f"{path}: {_why_unreadable(path)}") from None
    except openslide.OpenSlideError as err:
        raise SlideError(f"{path}: OpenSlide cannot open it ({err})") from None


def _why_unreadable(path: Path) -> str:
    """A TIFF header on a file OpenSlide rejects almost always means a cut-off copy."""
    with open(path, "rb") as fh:
        magic = fh.read(4)
    if magic in (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+"):
        return (f"truncated or corrupt TIFF ({path.stat().st_size} bytes): it has a TIFF header "
                "but its directory or image data cannot be read")
    return "not a slide format OpenSlide can read"


class SlideReader:
    """Reads tiles of one slide from its native levels (see module doc). One per process:
    DataLoader workers each open their own (the file descriptor is not shared)."""

    def __init__(self, path, cache_tiles: int = 512):
        self.path = str(path)
        self.slide = open_slide(path)
        self.level_dimensions = self.slide.level_dimensions
        self.level_downsamples = self.slide.level_downsamples
        self._cache: OrderedDict = OrderedDict()
        self._cache_tiles = cache_tiles
        self._pages = self._tiff_pages()
        self._fd = os.open(self.path, os.O_RDONLY) if self._pages else None

    @property
    def backend(self) -> str:
        return "tifffile" if self._pages else "openslide"

    def _tiff_pages(self):
        """The tiled TIFF page holding each OpenSlide level, or None if any is missing."""
        try:
            import tifffile

            tif = tifffile.TiffFile(self.path)
        except Exception:
            return None
        self._tif = tif
        pages = []
        for w, h in self.level_dimensions:
            match = [
                p
                for p in tif.pages
                if p.is_tiled and p.imagewidth == w and p.imagelength == h and p.samplesperpixel >= 3
            ]
            if not match:
                tif.close()
                return None
            pages.append(match[0])
        return pages

    def close(self):
        for tile in filter(_reusable, self._cache.values()):
            spare = _SPARE_BUFFERS.setdefault(tile.shape, [])
            if len(spare) < self._cache_tiles:
                spare.append(tile)
        self._cache.clear()
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
        if self._pages:
            self._tif.close()
        self.slide.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # -- pixels ------------------------------------------------------------------------
    def _decoded_tile(self, level: int, ty: int, tx: int) -> np.ndarray:
        key = (level, ty, tx)
        tile = self._cache.get(key)
        if tile is not None:
            self._cache.move_to_end(key)
            return tile
        page = self._pages[level]
        ntx = -(-page.imagewidth // page.tilewidth)
        index = ty * ntx + tx
        offset, count = page.dataoffsets[index], page.databytecounts[index]
        if count == 0:
            # a sparse tile (never written): background, as OpenSlide reads it (transparent)
            tile = np.full((page.tilelength, page.tilewidth, 3), BACKGROUND, np.uint8)
            return self._remember(key, tile)
        data = os.pread(self._fd, count, offset)
        if len(data) != count:
            raise SlideError(f"{self.path}: truncated file ({self._tile_name(level, ty, tx)})")
        try:
            if page.compression == 7 and page.photometric in (2, 6):
                # plain JPEG (RGB or YCbCr): libjpeg-turbo directly, ~1.3x faster than page.decode
                shape = (page.tilelength, page.tilewidth, 3)
                tile = imagecodecs.jpeg8_decode(data, tables=page.jpegtables, out=self._tile_buffer(shape))
            else:
                segment = page.decode(data, index, jpegtables=page.jpegtables)[0]
                tile = np.asarray(segment)
            tile = tile.reshape(page.tilelength, page.tilewidth, -1)[..., :3]
        except Exception as err:  # noqa: BLE001 - any codec error: name the slide and the tile
            raise SlideError(f"{self.path}: {self._tile_name(level, ty, tx)} cannot be decoded "
                             f"({type(err).__name__}: {err})") from None
        return self._remember(key, tile)

    def _tile_name(self, level: int, ty: int, tx: int) -> str:
        """Where a stored tile is: its level, row and column, and its level-0 position."""
        page = self._pages[level]
        x, y = tx * page.tilewidth, ty * page.tilelength
        d = self.level_downsamples[level]
        return (f"stored tile at level {level}, row {ty}, column {tx} (level pixels x {x}, y {y}; "
                f"level-0 x {round(x * d)}, y {round(y * d)})")

    def _tile_buffer(self, shape) -> np.ndarray:
        """Where to decode a tile: the least recently used tile's buffer once the cache is
        full, else a closed reader's, else new memory (see _SPARE_BUFFERS)."""
        if len(self._cache) >= self._cache_tiles:
            _, old = self._cache.popitem(last=False)
            if old.shape == shape and _reusable(old):
                return old
        try:
            return _SPARE_BUFFERS[shape].pop()
        except (KeyError, IndexError):  # none spare (or taken by another thread meanwhile)
            return decode_buffer(shape)

    def _remember(self, key, tile: np.ndarray) -> np.ndarray:
        self._cache[key] = tile
        if len(self._cache) > self._cache_tiles:
            self._cache.popitem(last=False)
        return tile

    def read_level_region(self, level: int, x: int, y: int, w: int, h: int, out=None) -> np.ndarray:
        """RGB uint8 (h, w, 3) of a region in the level's own pixel grid; white outside.
        Written into `out` when given (saves a copy when filling a batch)."""
        if out is None:
            out = np.empty((h, w, 3), np.uint8)
        if not self._pages:
            return self._read_openslide_region(level, x, y, w, h, out)
        self._fill_regions(level, [0], [x], [y], w, h, out[None])
        return out

    def _fill_regions(self, level: int, ns, xs, ys, w: int, h: int, out: np.ndarray) -> None:
        """Writes the level regions (xs[i], ys[i], w, h) into out[ns[i]], white outside the
        level. Each stored tile they cover is decoded once and copied into every region that
        touches it while it is still in the CPU cache, in the order the regions first need it
        (a tile table's order keeps neighbours together)."""
        lw, lh = self.level_dimensions[level]
        page = self._pages[level]
        tw, th = page.tilewidth, page.tilelength
        ns, xs, ys = (np.asarray(v, np.int64) for v in (ns, xs, ys))
        x_lo, y_lo = np.maximum(xs, 0), np.maximum(ys, 0)
        x_hi, y_hi = np.minimum(xs + w, lw), np.minimum(ys + h, lh)
        for n in ns[(x_lo > xs) | (y_lo > ys) | (x_hi < xs + w) | (y_hi < ys + h)]:
            out[n] = BACKGROUND  # part of the region lies outside the level
        inside = (x_lo < x_hi) & (y_lo < y_hi)
        ns, xs, ys, x_lo, y_lo, x_hi, y_hi = (v[inside] for v in (ns, xs, ys, x_lo, y_lo, x_hi, y_hi))
        # one piece per region and stored tile it covers
        tx0, ty0 = x_lo // tw, y_lo // th
        ncol, nrow = (x_hi - 1) // tw - tx0 + 1, (y_hi - 1) // th - ty0 + 1
        r = np.repeat(np.arange(len(xs)), ncol * nrow)
        k = np.arange(len(r)) - np.repeat(np.cumsum(ncol * nrow) - ncol * nrow, ncol * nrow)
        tx, ty = tx0[r] + k % ncol[r], ty0[r] + k // ncol[r]
        ax0, ax1 = np.maximum(x_lo[r], tx * tw), np.minimum(x_hi[r], (tx + 1) * tw)
        ay0, ay1 = np.maximum(y_lo[r], ty * th), np.minimum(y_hi[r], (ty + 1) * th)
        _, first, which = np.unique(ty * (lw // tw + 1) + tx, return_index=True, return_inverse=True)
        order = np.argsort(first[which], kind="stable")
        columns = (ty, tx, ns[r], ay0 - ys[r], ay1 - ys[r], ax0 - xs[r], ax1 - xs[r], ay0 - ty * th, ax0 - tx * tw)
        last = None
        for ty_, tx_, n, dy0, dy1, dx0, dx1, sy, sx in zip(*(c[order].tolist() for c in columns)):
            if (ty_, tx_) != last:
                tile, last = self._decoded_tile(level, ty_, tx_), (ty_, tx_)
            out[n, dy0:dy1, dx0:dx1] = tile[sy : sy + dy1 - dy0, sx : sx + dx1 - dx0]

    def _read_openslide_region(self, level, x, y, w, h, out) -> np.ndarray:
        lw, lh = self.level_dimensions[level]
        x_lo, y_lo, x_hi, y_hi = max(x, 0), max(y, 0), min(x + w, lw), min(y + h, lh)
        if x_lo > x or y_lo > y or x_hi < x + w or y_hi < y + h:
            out[...] = BACKGROUND  # part of the region lies outside the level
        if x_lo >= x_hi or y_lo >= y_hi:
            return out
        d = self.level_downsamples[level]
        xy0 = (round(x_lo * d), round(y_lo * d))
        try:
            region = self.slide.read_region(xy0, level, (x_hi - x_lo, y_hi - y_lo))
        except openslide.OpenSlideError as err:
            raise SlideError(f"{self.path}: the region at level {level}, level-0 x {xy0[0]}, y {xy0[1]} "
                             f"({x_hi - x_lo} x {y_hi - y_lo} px) cannot be read ({err})") from None
        rgba = np.asarray(region)
        # transparent (outside scanned area) -> background
        rgb = np.where(rgba[..., 3:4] == 0, BACKGROUND, rgba[..., :3])
        out[y_lo - y : y_hi - y, x_lo - x : x_hi - x] = rgb
        return out

    def read_tile(self, row, out=None) -> np.ndarray:
        """The tile of a tile-table row: uint8 (tile_px, tile_px, 3), native pixels, resized
        (area) only where the row says native is False. Written into `out` when given."""
        get = row.__getitem__ if hasattr(row, "__getitem__") else lambda k: getattr(row, k)
        level, size0, tile_px = int(get("level")), int(get("size0")), int(get("tile_px"))
        step, n = level_read_size(size0, float(get("downsample")))
        x, y = int(get("x0")) // step, int(get("y0")) // step
        if n == tile_px:
            return self.read_level_region(level, x, y, n, n, out)
        region = self.read_level_region(level, x, y, n, n)
        region = np.asarray(Image.fromarray(region).resize((tile_px, tile_px), Image.BOX))
        if out is None:
            return region
        out[...] = region
        return out

    def read_tiles(self, df, out=None) -> np.ndarray:
        """uint8 (N, T, T, 3) for the rows of a tile-table DataFrame (all the same tile_px).
        Written into `out` when given: a caller reading batch after batch reuses one buffer,
        where a fresh one costs the kernel's first-touch faults on every batch (a 256-tile
        batch is 38 MB, above malloc's threshold for recycling freed memory)."""
        if len(df) == 0:
            return np.zeros((0, 0, 0, 3), np.uint8)
        tile_px = int(df["tile_px"].iloc[0])
        shape = (len(df), tile_px, tile_px, 3)
        if out is None:
            out = np.empty(shape, np.uint8)
        elif out.shape != shape or out.dtype != np.uint8:
            raise ValueError(f"{self.path}: read_tiles needs a uint8 buffer of shape {shape}, got {out.dtype} {out.shape}")
        cols = df[["x0", "y0", "size0", "tile_px", "level", "downsample"]]
        step, side = level_read_sizes(cols)
        native = side == tile_px if self._pages else np.zeros(len(df), bool)
        for n in np.flatnonzero(~native):
            self.read_tile(cols.iloc[n].to_dict(), out[n])
        levels = cols["level"].to_numpy(np.int64)
        x, y = cols["x0"].to_numpy(np.int64) // step, cols["y0"].to_numpy(np.int64) // step
        for level in np.unique(levels[native]):
            ns = np.flatnonzero(native & (levels == level))
            self._fill_regions(int(level), ns, x[ns], y[ns], tile_px, tile_px, out)
        return out

    def thumbnail(self, max_side: int = 2048) -> tuple[np.ndarray, float]:
        """Low-resolution RGB image of the whole slide and its downsample w.r.t. level 0.
        Reads the coarsest level band by band and box-reduces, so memory stays bounded even
        for a slide whose only level is gigapixel."""
        level = len(self.level_dimensions) - 1
        lw, lh = self.level_dimensions[level]
        factor = max(1, -(-max(lw, lh) // max_side))
        band = factor * max(1, 1024 // factor)
        rows = []
        for y in range(0, lh, band):
            h = min(band, lh - y)
            region = self.read_level_region(level, 0, y, lw, h)
            rows.append(_box_reduce(region, factor))
        return np.concatenate(rows, axis=0), self.level_downsamples[level] * factor


def _check_tile_magic(path, fh, page, offsets, counts, levels: dict) -> None:
    """SlideError naming the first stored tile of a TIFF page whose data does not start with
    its codec's magic bytes (sparse tiles, 0 bytes, are background and fine). `levels`:
    OpenSlide's (width, height) -> level, to name the level."""
    magic = CODEC_MAGIC[int(page.compression)]
    for index in np.flatnonzero(counts > 0):
        fh.seek(int(offsets[index]))
        if fh.read(len(magic)) != magic:
            ntx = -(-page.imagewidth // page.tilewidth)
            ty, tx = divmod(int(index), ntx)
            level = levels.get((page.imagewidth, page.imagelength))
            where = f"level {level}" if level is not None else f"TIFF page {page.index} (not a level)"
            codec = getattr(page.compression, "name", str(page.compression))
            raise SlideError(
                f"{path}: corrupt tile: the stored tile at {where}, row {ty}, column {tx} (level pixels "
                f"x {tx * page.tilewidth}, y {ty * page.tilelength}) is not {codec} data; re-export or "
                "re-copy the slide"
            )


def decode_buffer(shape) -> np.ndarray:
    """New uint8 memory for a decoded tile, starting 16 bytes past a 64-byte boundary.
    libjpeg-turbo decoded a 256-px tile ~15% slower into rows 32-byte aligned (a tile row,
    768 bytes, keeps the alignment of the first) than into rows 16 bytes off it, on the AMD
    EPYC (Zen 4) this was measured on (docs/results.md); where a fresh array lands depends on
    malloc."""
    nbytes = int(np.prod(shape))
    memory = np.empty(nbytes + 64, np.uint8)
    start = (16 - memory.ctypes.data) % 64
    return memory[start : start + nbytes].reshape(shape)


def _reusable(tile: np.ndarray) -> bool:
    """A cached tile whose memory can take a decode: a whole buffer, not a channel view of a
    page.decode segment."""
    return tile.flags.c_contiguous and tile.flags.writeable


def _box_reduce(img: np.ndarray, factor: int) -> np.ndarray:
    """Mean over factor x factor blocks (edges padded with background)."""
    if factor == 1:
        return img
    h, w = img.shape[:2]
    ph, pw = -(-h // factor) * factor, -(-w // factor) * factor
    padded = np.full((ph, pw, img.shape[2]), BACKGROUND, np.float32)
    padded[:h, :w] = img
    reduced = padded.reshape(ph // factor, factor, pw // factor, factor, -1).mean(axis=(1, 3))
    return reduced.round().astype(np.uint8)


# how the stored data of each compression starts: JPEG's SOI marker, a JPEG 2000 codestream's
# SOC + SIZ markers (Aperio 33003/33005, JPEG 2000 34712)
CODEC_MAGIC = {7: b"\xff\xd8", 33003: b"\xff\x4f\xff\x51", 33005: b"\xff\x4f\xff\x51",
               34712: b"\xff\x4f\xff\x51"}


def check_readable(path) -> None:
    """Raise SlideError if the slide's stored data runs past the end of the file (truncated
    download/copy) or a stored JPEG / JPEG 2000 tile does not start as its codec's data must
    (a zeroed or overwritten tile: checked for every tile of every level, a few bytes each),
    then decode one tile of the coarsest level as a smoke test."""
    size = os.path.getsize(path)
    try:
        import tifffile

        with openslide.OpenSlide(str(path)) as slide:
            levels = {dims: n for n, dims in enumerate(slide.level_dimensions)}
        with tifffile.TiffFile(path) as tif, open(path, "rb") as fh:
            for page in tif.pages:
                offsets = np.asarray(page.dataoffsets, np.int64)
                counts = np.asarray(page.databytecounts, np.int64)
                ends = offsets + counts
                if len(ends) and ends.max() > size:
                    raise SlideError(
                        f"{path}: truncated file: image data runs to byte {int(ends.max())} "
                        f"but the file has {size} bytes"
                    )
                if page.is_tiled and page.compression in CODEC_MAGIC:
                    _check_tile_magic(path, fh, page, offsets, counts, levels)
    except SlideError:
        raise
    except Exception:
        pass  # not a TIFF container (e.g. .mrxs): OpenSlide's own read below checks it
    with SlideReader(path) as reader:
        level = len(reader.level_dimensions) - 1
        w, h = reader.level_dimensions[level]
        try:
            reader.read_level_region(level, 0, 0, min(w, 256), min(h, 256))
        except SlideError:
            raise
        except Exception as err:
            raise SlideError(f"{path}: pixel data cannot be decoded ({err})") from None
