"""Atomic output: every file the workflow writes appears whole or not at all, so a killed
job never leaves a truncated result that a rerun would trust."""

from __future__ import annotations

import os
from pathlib import Path

import pandas as pd


def partial_path(path) -> Path:
    """Where `path` is written before it is renamed into place: a fixed hidden sibling that
    keeps the suffix (for writers that choose the format by extension). Fixed, not random, so
    that the rerun of a killed job overwrites and renames it instead of leaving a stray."""
    path = Path(path)
    return path.with_name(f".{path.name}.partial{path.suffix}")


def write_atomic(path, write) -> None:
    """Call write(tmp_path) for the partial sibling of `path`, then rename it over `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = partial_path(path)
    tmp.unlink(missing_ok=True)  # left by a killed write
    try:
        write(str(tmp))
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def read_tsv(path) -> pd.DataFrame:
    """A TSV the workflow wrote (tidy metrics, logs, summaries): an empty cell is missing,
    while text such as "NA" or "None" stays text."""
    return pd.read_csv(path, sep="\t", keep_default_na=False, na_values=[""])
