"""Atomic output: every file the workflow writes appears whole or not at all, so a killed
job never leaves a truncated result that a rerun would trust."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pandas as pd


def write_atomic(path, write) -> None:
    """Call write(tmp_path) for a temporary sibling of `path`, then rename it over `path`.

    The temporary file gets the umask's permissions (mkstemp's 0600 would make results
    private) and keeps `path`'s suffix, for writers that choose the format by extension."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=path.suffix)
    os.close(fd)
    try:
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def read_tsv(path) -> pd.DataFrame:
    """A TSV the workflow wrote (tidy metrics, logs, summaries): an empty cell is missing,
    while text such as "NA" or "None" stays text."""
    return pd.read_csv(path, sep="\t", keep_default_na=False, na_values=[""])
