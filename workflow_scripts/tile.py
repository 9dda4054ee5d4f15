"""Tile one slide: tile table (Parquet), CLAM/TRIDENT coords per magnification, QC image."""

from madflow.io import write_atomic
from madflow.manifest import read_checked_manifest
from madflow.runlog import setup
from madflow.slides import mag_str
from madflow.tiling import qc_image, tile_slide, write_coords_h5

log = setup(snakemake.log[0])
p = snakemake.params
manifest = read_checked_manifest(snakemake.input.manifest)
slide = manifest.set_index("slide_id").loc[snakemake.wildcards.slide_id].to_dict()
slide["slide_id"] = snakemake.wildcards.slide_id
grid, thumb, thumb_ds, mask = tile_slide(slide, p.mags, p.tile_px, p.min_tissue)
for mag, path in zip(p.mags, snakemake.output.coords):
    write_coords_h5(grid, slide, mag, p.tile_px, path)  # empty, lacking=True, where the slide lacks mag
for mag, n in grid[grid["tissue"]].groupby("mag").size().items():
    log.info("%sx: %d tissue tiles of %d", mag_str(mag), n, int((grid["mag"] == mag).sum()))
write_atomic(snakemake.output.qc, lambda t: qc_image(thumb, thumb_ds, mask, grid).save(t, format="PNG"))
write_atomic(snakemake.output.table, lambda t: grid.to_parquet(t, index=False))
