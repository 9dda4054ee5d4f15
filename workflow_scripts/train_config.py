"""Write what pretraining reads (model, train, tiling, the experiment): the --config of
`python -m madflow.train`."""

import json
from pathlib import Path

from madflow.io import write_atomic
from madflow.runlog import setup

log = setup(snakemake.log[0])
config = snakemake.params.config
write_atomic(snakemake.output.config, lambda t: Path(t).write_text(json.dumps(config, indent=2)))
log.info("training config of %s", ", ".join(config["experiments"]))
