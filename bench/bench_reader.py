"""Tile-reader throughput and tiler peak memory.

Prints, per magnification of a synthetic 40x Aperio slide: madflow's SlideReader
(native level, decoded-tile cache), read as the embed rule reads (256-tile batches into one
reused buffer), beside OpenSlide read_region one call per tile on the
same tiles (what CLAM/TRIDENT-style loaders do) and the raw decode limit of the stored
JPEG tiles, in tiles per CPU-second (median of repeats; the three are timed in turn within each
repeat, and the share of the decode limit is the median of the per-repeat ratios). Then the tile rule's peak RSS on a
large slide (default 61440 px square, written tile by tile) in a fresh process.

    python bench/bench_reader.py [--size 8192] [--tile-px 224] [--big 61440] [--repeats 5]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import imagecodecs
import numpy as np
import openslide
import pandas as pd
import tifffile

from madflow.manifest import check_manifest
from madflow.slides import SlideReader, decode_buffer, mag_str
from madflow.synth import make_slide
from madflow.tiling import tile_slide

MAGS = [2.5, 10.0, 40.0]
BATCH = 256  # the embed rule's default batch (config.yaml embed.batch_size)


def cpu_seconds(fns: dict, repeats: int) -> dict:
    """CPU seconds of each function per repeat, the functions run in turn within every repeat
    (after one untimed warm-up each), so that load drifting on a shared machine hits them all
    alike and a per-repeat ratio compares like with like."""
    for fn in fns.values():
        fn()
    times = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            t = time.process_time()
            fn()
            times[name].append(max(time.process_time() - t, 1e-9))
    return times


def checked_row(path, tmp, tile_px):
    table = Path(tmp) / f"{Path(path).stem}.tsv"
    pd.DataFrame({"slide_id": [Path(path).stem], "path": [str(path)]}).to_csv(table, sep="\t", index=False)
    return check_manifest(table, MAGS, tile_px, "error", 0.3, 0)[0].iloc[0].to_dict()


def throughput(path, tmp, tile_px, repeats):
    slide = checked_row(path, tmp, tile_px)
    grid, *_ = tile_slide(slide, MAGS, tile_px, 0.5)
    rows = []
    for mag in MAGS:
        tiles = grid[(grid["mag"] == mag) & grid["tissue"]]
        if len(tiles) > 4000:
            tiles = tiles.iloc[:4000]  # a contiguous run in table (hierarchical) order
        n = len(tiles)

        def ours():  # as embed_slide reads: batch by batch into one reused buffer
            pixels = np.empty((min(BATCH, n), tile_px, tile_px, 3), np.uint8)
            with SlideReader(path) as reader:
                for start in range(0, n, BATCH):
                    batch = tiles.iloc[start : start + BATCH]
                    reader.read_tiles(batch, out=pixels[: len(batch)])

        def per_tile_openslide():
            slide_ = openslide.OpenSlide(str(path))
            for r in tiles.itertuples():
                slide_.read_region((int(r.x0), int(r.y0)), int(r.level), (tile_px, tile_px))
            slide_.close()

        level = int(tiles["level"].iloc[0])
        width = openslide.OpenSlide(str(path)).level_dimensions[level][0]
        fd = os.open(path, os.O_RDONLY)
        with tifffile.TiffFile(path) as tif:
            page = next(p for p in tif.pages if p.is_tiled and p.imagewidth == width)
            tw, ntx = page.tilewidth, -(-page.imagewidth // page.tilewidth)
            step = round(float(tiles["downsample"].iloc[0]))
            # the stored tiles these reads touch, each once: the decode work no reader avoids
            touched = set()
            for r in tiles.itertuples():
                x, y, side = r.x0 // step, r.y0 // step, r.size0 // step
                for ty in range(y // tw, (y + side - 1) // tw + 1):
                    for tx in range(x // tw, (x + side - 1) // tw + 1):
                        touched.add(ty * ntx + tx)
            chunks = [
                (i, os.pread(fd, page.databytecounts[i], page.dataoffsets[i]))
                for i in sorted(touched) if i < len(page.dataoffsets)
            ]
            os.close(fd)
            tables = page.jpegtables

        # one reused buffer at the alignment libjpeg-turbo decodes fastest into: a fresh array
        # per decode ran 0-15% slower, by where malloc put it (madflow.slides.decode_buffer)
        scratch = decode_buffer((page.tilelength, page.tilewidth, 3))

        def raw_decode():  # libjpeg-turbo on the stored bytes, nothing else
            for _, data in chunks:
                imagecodecs.jpeg8_decode(data, tables=tables, out=scratch)

        times = cpu_seconds({"ours": ours, "raw": raw_decode, "openslide": per_tile_openslide}, repeats)
        rate_ours = n / statistics.median(times["ours"])
        rate_os = n / statistics.median(times["openslide"])
        raw_equiv = n / statistics.median(times["raw"])  # output tiles/s if decoding were all the work
        # the share of the decode limit: the median of the per-repeat ratios (paired in time)
        share = statistics.median(r / o for r, o in zip(times["raw"], times["ours"]))
        rows.append(
            {
                "mag": mag_str(mag) + "x",
                "tiles": n,
                "madflow tiles/CPU-s": round(rate_ours),
                "openslide per-tile": round(rate_os),
                "ratio vs openslide": round(rate_ours / rate_os, 2),
                "stored tiles decoded": len(chunks),
                "raw limit (T-px tiles/s)": round(raw_equiv),
                "% of raw limit": round(100 * share),
            }
        )
    return pd.DataFrame(rows)


def big_slide(path, size):
    """A large Aperio pyramid written tile by tile with cheap content (a tissue disc on glass):
    the tiler's memory does not depend on what the tissue looks like, and rendering the
    demo's tissue at 60k px takes ~20 min."""
    import tifffile

    from madflow.synth.pyramid import TILE, TIFF_KWARGS, aperio_description

    def level_tiles(side):
        yy, xx = np.mgrid[0:TILE, 0:TILE]
        for ty in range(0, side, TILE):
            for tx in range(0, side, TILE):
                r2 = ((xx + tx - side / 2) ** 2 + (yy + ty - side / 2) ** 2) / (0.4 * side) ** 2
                tile = np.where((r2 < 1)[..., None], np.array([200, 120, 170], np.uint8), np.uint8(240))
                yield tile.astype(np.uint8)

    with tifffile.TiffWriter(path, bigtiff=True) as tif:
        for n in range(3):
            side = size // 4**n
            tif.write(level_tiles(side), shape=(side, side, 3), dtype=np.uint8,
                      description=aperio_description(size, "big") if n == 0 else f"Aperio Image Library level {n}",
                      **TIFF_KWARGS)


def tile_peak_rss(path, tmp, tile_px):
    """Peak RSS (MB, VmHWM of a fresh process: ru_maxrss would carry the parent's over
    fork) of tiling the slide, and its wall time."""
    code = (
        "import sys, time, pandas as pd\n"
        "from madflow.tiling import tile_slide\n"
        "row = pd.read_json(sys.argv[1], typ='series').to_dict()\n"
        "t = time.time(); grid, *_ = tile_slide(row, [2.5, 10, 40], int(sys.argv[2]), 0.5)\n"
        "hwm = [l for l in open('/proc/self/status') if l.startswith('VmHWM')][0].split()[1]\n"
        "print(len(grid), time.time() - t, int(hwm) / 1024)\n"
    )
    row = pd.Series(checked_row(path, tmp, tile_px))
    js = Path(tmp) / "row.json"
    row.to_json(js)
    out = subprocess.run([sys.executable, "-c", code, str(js), str(tile_px)], capture_output=True, text=True, check=True)
    n, wall, rss = out.stdout.split()
    return int(n), float(wall), float(rss)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", type=int, default=8192)
    ap.add_argument("--tile-px", type=int, default=224)
    ap.add_argument("--big", type=int, default=61440, help="side of the memory-benchmark slide (0: skip)")
    ap.add_argument("--only-memory", action="store_true", help="skip the throughput table")
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "bench.svs"
        make_slide(path, seed=0, size=args.size)
        if not args.only_memory:
            table = throughput(path, tmp, args.tile_px, args.repeats)
            print(f"\nReader throughput, {args.size} px synthetic 40x Aperio slide, T={args.tile_px}, "
                  f"median of {args.repeats}, one process:")
            print(table.to_string(index=False))
            # rates are CPU-time, but a busy machine still slows them (shared caches, memory)
            print("load average (1, 5, 15 min) after the runs: " + ", ".join(f"{v:.2f}" for v in os.getloadavg()))
        if args.big:
            big = Path(tmp) / "big.svs"
            t = time.time()
            big_slide(big, args.big)
            made = time.time() - t
            n, wall, rss = tile_peak_rss(big, tmp, args.tile_px)
            small_n, small_wall, small_rss = tile_peak_rss(path, tmp, args.tile_px)
            print(f"\nTiler peak memory (fresh process; a whole level 0 would be "
                  f"{args.big**2 * 3 / 2**30:.1f} GiB decoded):")
            print(pd.DataFrame([
                {"slide px": args.size, "tiles": small_n, "tile wall s": round(small_wall, 2), "peak RSS MB": round(small_rss)},
                {"slide px": args.big, "tiles": n, "tile wall s": round(wall, 2), "peak RSS MB": round(rss)},
            ]).to_string(index=False))
            print(f"(writing the {args.big} px slide took {made:.0f} s, {big.stat().st_size / 2**20:.0f} MiB)")


if __name__ == "__main__":
    main()
