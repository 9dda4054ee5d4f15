"""Generate the embedded synthetic demo slides and their manifest."""

import logging
from pathlib import Path

from madflow.synth import make_demo

logging.basicConfig(filename=snakemake.log[0], level=logging.INFO, format="%(asctime)s %(message)s")
demo = snakemake.params.demo
out = make_demo(
    Path(snakemake.output.manifest).parent,
    n_slides=demo["n_slides"],
    size=demo["size"],
    seed=snakemake.params.seed,
    n_test=demo["n_test"],
    workers=snakemake.threads,
)
logging.info("wrote %s", out)
