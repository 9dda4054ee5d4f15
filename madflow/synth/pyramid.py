"""Pyramidal TIFF writers: Aperio-style .svs (what OpenSlide opens as vendor aperio) and
generic tiled TIFF, from an array or streamed band by band from a renderer."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Callable

import numpy as np

from madflow.io import write_atomic

TILE = 256               # stored tile side (all levels)
JPEG_Q = 90

# what OpenSlide needs to see an Aperio pyramid (measured): tiled JPEG pages, no tifffile metadata
TIFF_KWARGS = dict(tile=(TILE, TILE), photometric="rgb", compression="jpeg",
                compressionargs={"level": JPEG_Q}, metadata=None, software=False)


def aperio_description(size, name, objective_power=40, mpp=0.25):
    return (f"Aperio Image Library v12.0.15 madflow-synth\r\n{size}x{size} [0,0 {size}x{size}]"
            f" ({TILE}x{TILE}) JPEG/RGB Q={JPEG_Q}|AppMag = {objective_power:g}|MPP = {mpp:g}"
            f"|Filename = {name}|Synthetic = madflow.synth")


def write_pyramid(path, image: np.ndarray, *, objective_power=40, mpp=0.25, levels: int = 3):
    """Write an RGB image as a tiled JPEG pyramid (levels 1, 4, 16, ... by 4x4 box average).

    With objective_power: an Aperio .svs description (AppMag, MPP when given). Without it:
    a generic tiled TIFF, whose MPP (when given) is in the resolution tags. For tests and
    users converting arrays; the demo slides use the streaming writer of make_slide."""
    import tifffile

    path = Path(path)
    h, w = image.shape[:2]
    if objective_power:
        extra = dict(description=aperio_description(w, path.stem, objective_power, mpp or 0))
        if not mpp:  # an Aperio file without MPP
            extra["description"] = extra["description"].replace(f"|MPP = {0:g}", "")
    elif mpp:
        extra = dict(resolution=(1e4 / mpp, 1e4 / mpp), resolutionunit="CENTIMETER")
    else:
        extra = {}
    def write(tmp):
        nonlocal extra
        with tifffile.TiffWriter(tmp) as tif:
            level = image
            for n in range(levels):
                if n:
                    lh, lw = level.shape[0] // 4 * 4, level.shape[1] // 4 * 4
                    level = level[:lh, :lw].reshape(lh // 4, 4, lw // 4, 4, 3).mean((1, 3))
                    level = np.floor(level + 0.5).astype(np.uint8)
                    if objective_power:
                        extra = dict(description=f"Aperio Image Library level {n}")
                    elif mpp:
                        extra = dict(resolution=(1e4 / mpp / 4 ** n,) * 2, resolutionunit="CENTIMETER")
                tif.write(level, subfiletype=1 if n and not objective_power else 0, **TIFF_KWARGS, **extra)

    write_atomic(path, write)


def write_streamed_svs(path: Path, size: int, render_band: Callable[[int], np.ndarray]) -> None:
    """Write a square Aperio .svs of side ``size`` (levels 1, 4, 16) whose level 0 is rendered
    one band of TILE rows at a time: ``render_band(y0)`` -> uint8 [TILE, size, 3]. Memory
    stays at a band plus the two lower levels (level 1 on disk for very large slides)."""
    import tifffile

    S = size
    s1, s2 = S // 4, S // 16
    tmpdir_files = []
    if S > 16384:  # keep level 1 on disk for very large slides
        fd, mm = tempfile.mkstemp(suffix=".lvl1", dir=path.parent)
        os.close(fd)
        tmpdir_files.append(mm)
        lvl1 = np.memmap(mm, np.uint8, "w+", shape=(s1, s1, 3))
    else:
        lvl1 = np.empty((s1, s1, 3), np.uint8)
    lvl2 = np.empty((s2, s2, 3), np.uint8)

    def tiles():
        for y0 in range(0, S, TILE):
            band = render_band(y0)
            b1 = band.reshape(TILE // 4, 4, s1, 4, 3).mean((1, 3), dtype=np.float32)
            b1 = np.floor(b1 + 0.5).astype(np.uint8)
            lvl1[y0 // 4:y0 // 4 + TILE // 4] = b1
            b2 = b1.reshape(TILE // 16, 4, s2, 4, 3).mean((1, 3), dtype=np.float32)
            lvl2[y0 // 16:y0 // 16 + TILE // 16] = np.floor(b2 + 0.5).astype(np.uint8)
            for tx in range(0, S, TILE):
                yield band[:, tx:tx + TILE]

    kw = TIFF_KWARGS

    def write(tmp):
        with tifffile.TiffWriter(tmp, bigtiff=S > 32768) as tif:
            tif.write(tiles(), shape=(S, S, 3), dtype=np.uint8,
                      description=aperio_description(S, path.stem), **kw)
            if isinstance(lvl1, np.memmap):
                lvl1.flush()
            tif.write(lvl1, description=f"Aperio Image Library {s1}x{s1} -> level 1", **kw)
            tif.write(lvl2, description=f"Aperio Image Library {s2}x{s2} -> level 2", **kw)

    try:
        write_atomic(path, write)
    finally:
        del lvl1
        for f in tmpdir_files:
            os.unlink(f)
