"""One slide's embeddings per magnification in CLAM's and in TRIDENT's feature layout."""

from pathlib import Path

from madflow.features import export_slide
from madflow.runlog import setup
from madflow.slides import mag_str

log = setup(snakemake.log[0])
out = snakemake.output
embeddings = Path(snakemake.input.embeddings) / f"{snakemake.wildcards.slide_id}.h5"
counts = export_slide(str(embeddings), snakemake.input.coords, out.h5, out.pt, snakemake.params.mags,
                      out.trident_patches, out.trident_features)
for mag, n in zip(snakemake.params.mags, counts):
    log.info("%sx: %d tiles", mag_str(mag), n)
