"""Record what produced an experiment's results: resolved config, git commit, versions
(recorded beside the results; no job reads it)."""

import json
from pathlib import Path
from datetime import datetime, timezone

from madflow.io import write_atomic
from madflow.provenance import provenance
from madflow.runlog import setup

log = setup(snakemake.log[0])
record = {
    "experiment": snakemake.wildcards.experiment,
    "config": snakemake.params.config,
    **provenance(),
    "written": datetime.now(timezone.utc).isoformat(),
}
write_atomic(snakemake.output.provenance, lambda t: Path(t).write_text(json.dumps(record, indent=2, default=str)))
log.info("commit %s", record["git_commit"])
