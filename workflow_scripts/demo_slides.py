"""Generate the embedded synthetic demo slides and their manifest."""

from pathlib import Path

from madflow.runlog import setup
from madflow.synth import make_demo

log = setup(snakemake.log[0])
demo = snakemake.params.demo
out = make_demo(
    Path(snakemake.output.manifest).parent,
    n_slides=demo["n_slides"],
    size=demo["size"],
    seed=snakemake.params.seed,
    n_test=demo["n_test"],
    workers=snakemake.threads,
    variant=demo.get("variant", "shared"),
)
log.info("wrote %s", out)
