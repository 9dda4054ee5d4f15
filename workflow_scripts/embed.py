"""Embed every tissue tile of a part of the slides with one experiment's encoder, loaded
once: one HDF5 per slide in the part's output folder. The folder is filled under its partial
name and renamed into place when every slide is in it, so a killed job leaves no folder
that a rerun could take for complete (docs/slides.md, After a crash or a kill)."""

import os
import shutil
from pathlib import Path

if snakemake.params.device == "cpu":
    # a job granted no GPU runs on CPU even where one is visible (before torch is imported)
    os.environ["CUDA_VISIBLE_DEVICES"] = ""

from madflow.embed import build_encoder, embed_slide  # noqa: E402
from madflow.io import partial_path  # noqa: E402
from madflow.runlog import setup  # noqa: E402

log = setup(snakemake.log[0])
p = snakemake.params
encoder_path = snakemake.input.encoder if snakemake.input.encoder else None
encode, name = build_encoder(p.settings, encoder_path, p.tile_px)
log.info("encoder: %s (device: %s)", name, p.device)
out = Path(snakemake.output.embeddings)
partial = partial_path(out)
shutil.rmtree(partial, ignore_errors=True)  # left by a killed run of this job
partial.mkdir(parents=True)
for table in snakemake.input.tables:
    embed_slide(table, encode, name, str(partial / f"{Path(table).stem}.h5"), p.batch_size)
os.replace(partial, out)
