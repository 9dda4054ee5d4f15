"""Embed every tissue tile of one slide with one experiment's encoder."""


from madflow.embed import build_encoder, embed_slide
from madflow.runlog import setup

log = setup(snakemake.log[0])
p = snakemake.params
encoder_path = snakemake.input.encoder if snakemake.input.encoder else None
encode, name = build_encoder(p.settings, encoder_path, p.tile_px)
log.info("encoder: %s", name)
embed_slide(snakemake.input.table, encode, name, snakemake.output.embeddings, p.batch_size)
