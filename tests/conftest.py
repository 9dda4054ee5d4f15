import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from madflow.config import deep_merge

REPO = Path(__file__).resolve().parents[1]


def merged_config(*overrides: dict) -> dict:
    """config.yaml with nested overrides applied (what --configfile does)."""

    config = yaml.safe_load((REPO / "config.yaml").read_text())
    for o in overrides:
        deep_merge(config, o)
    return config


@pytest.fixture
def workdir(tmp_path):
    """A run directory holding the small test config as its config.yaml."""
    small = yaml.safe_load((REPO / "tests" / "config_small.yaml").read_text())
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(merged_config(small)))
    return tmp_path


def run_snakemake(workdir, *args, timeout=1200, check=True):
    """Run the workflow in `workdir` with this interpreter's environment on PATH."""
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}:{os.environ['PATH']}")
    cmd = [sys.executable, "-m", "snakemake", "-s", str(REPO / "Snakefile"), "-d", str(workdir), *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout[-5000:]}\n{proc.stderr[-8000:]}")
    return proc
