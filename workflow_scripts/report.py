"""Snakemake's own HTML report (`snakemake --report`) of this run, as a target.

The nested call sees the same workflow, working directory and resolved config as this run;
--nolock lets it read the metadata while this job holds the lock."""

import os
import subprocess
import sys
import tempfile

import yaml

from madflow.runlog import setup

log = setup(snakemake.log[0])
with tempfile.NamedTemporaryFile("w", suffix=".yaml", delete=False) as cfg:
    yaml.safe_dump(snakemake.params.config, cfg)
cmd = [
    sys.executable, "-m", "snakemake", "-s", str(snakemake.params.snakefile), "-d", os.getcwd(),
    "--configfile", cfg.name, "--nolock", "--report", snakemake.output.html,
]
log.info("%s", " ".join(cmd))
try:
    subprocess.run(cmd, check=True, stdout=sys.stderr, stderr=sys.stderr)
finally:
    os.unlink(cfg.name)
