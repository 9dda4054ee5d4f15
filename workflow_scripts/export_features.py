"""One slide's embeddings per magnification in CLAM's and TRIDENT's feature layout."""

from madflow.features import export_slide
from madflow.runlog import setup
from madflow.slides import mag_str

log = setup(snakemake.log[0])
out = snakemake.output
counts = export_slide(snakemake.input.embeddings, snakemake.input.coords, out.h5, out.pt, snakemake.params.mags)
for mag, n in zip(snakemake.params.mags, counts):
    log.info("%sx: %d tiles", mag_str(mag), n)
