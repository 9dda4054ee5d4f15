"""Embed every tissue tile of one slide with one experiment's encoder."""

import os

if snakemake.params.device == "cpu":
    # a job granted no GPU runs on CPU even where one is visible (before torch is imported)
    os.environ["CUDA_VISIBLE_DEVICES"] = ""

from madflow.embed import build_encoder, embed_slide  # noqa: E402
from madflow.runlog import setup  # noqa: E402

log = setup(snakemake.log[0])
p = snakemake.params
encoder_path = snakemake.input.encoder if snakemake.input.encoder else None
encode, name = build_encoder(p.settings, encoder_path, p.tile_px)
log.info("encoder: %s (device: %s)", name, p.device)
embed_slide(snakemake.input.table, encode, name, snakemake.output.embeddings, p.batch_size)
