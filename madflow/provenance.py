"""What produced a result: git commit (and whether the tree was dirty), package versions."""

from __future__ import annotations

import platform
import subprocess
from importlib import metadata
from pathlib import Path

PACKAGES = [
    "madflow", "torch", "torchvision", "timm", "numpy", "pandas", "scikit-learn", "scipy",
    "openslide-python", "openslide-bin", "tifffile", "imagecodecs", "snakemake", "matplotlib",
]


def git_commit(where=None) -> tuple[str, bool]:
    where = Path(where or Path(__file__).resolve().parent)
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=where, capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = bool(
            subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=where,
                           capture_output=True, text=True, check=True).stdout.strip()
        )
    except (OSError, subprocess.CalledProcessError):
        return "unknown (not a git checkout)", False
    return commit, dirty


def provenance() -> dict:
    commit, dirty = git_commit()
    versions = {}
    for name in PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return {
        "git_commit": commit,
        "git_dirty": dirty,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "packages": versions,
    }
