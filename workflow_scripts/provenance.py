"""Record what produced an experiment's results: resolved config, git commit, versions."""

import json
from datetime import datetime, timezone

from madflow.provenance import provenance
from madflow.runlog import setup
from madflow.tiling import write_atomic

log = setup(snakemake.log[0])
record = {
    "experiment": snakemake.wildcards.experiment,
    "config": snakemake.params.config,
    **provenance(),
    "written": datetime.now(timezone.utc).isoformat(),
}
write_atomic(snakemake.output.config, lambda t: open(t, "w").write(json.dumps(record, indent=2, default=str)))
log.info("commit %s", record["git_commit"])
