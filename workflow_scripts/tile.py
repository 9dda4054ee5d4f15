"""Tile one slide: tile table (Parquet), CLAM/TRIDENT coords per magnification, QC image."""

import logging

from madflow.io import write_atomic
from madflow.runlog import setup
from madflow.slides import mag_str
from madflow.tiling import qc_image, tile_slide, write_coords_h5

log = setup(snakemake.log[0])
p = snakemake.params
slide = p.slide  # its checked manifest row
for note in filter(None, slide["notes"].split("; ")):
    log.warning("%s: %s", slide["slide_id"], note)
grid, thumb, thumb_ds, mask = tile_slide(slide, p.mags, p.tile_px, p.min_tissue, p.class_map)
for mag, path in zip(p.mags, snakemake.output.coords):
    write_coords_h5(grid, slide, mag, p.tile_px, path)  # empty, lacking=True, where the slide lacks mag
for mag in sorted(grid["mag"].unique()):
    at_mag = grid[grid["mag"] == mag]
    n = int(at_mag["tissue"].sum())
    log.log(logging.INFO if n else logging.WARNING, "%sx: %d tissue tiles of %d%s", mag_str(mag), n, len(at_mag),
            "" if n else f" (none reaches min_tissue {p.min_tissue}: nothing of this slide is used at this magnification)")
write_atomic(snakemake.output.qc, lambda t: qc_image(thumb, thumb_ds, mask, grid).save(t, format="PNG"))
write_atomic(snakemake.output.table, lambda t: grid.to_parquet(t, index=False))
