"""Record what produced an experiment's results: resolved config, git commit, versions."""

import json
import logging
from datetime import datetime, timezone

from madflow.provenance import provenance
from madflow.tiling import write_atomic

logging.basicConfig(filename=snakemake.log[0], level=logging.INFO, format="%(asctime)s %(message)s")
record = {
    "experiment": snakemake.wildcards.experiment,
    "config": snakemake.params.config,
    **provenance(),
    "written": datetime.now(timezone.utc).isoformat(),
}
write_atomic(snakemake.output.config, lambda t: open(t, "w").write(json.dumps(record, indent=2, default=str)))
logging.info("commit %s", record["git_commit"])
