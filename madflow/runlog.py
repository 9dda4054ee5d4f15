"""Per-job logging for the workflow's scripts: everything, progress bars included, goes to
the rule's log file under results/logs/ instead of the terminal."""

from __future__ import annotations

import logging
import sys


def setup(log_path: str) -> logging.Logger:
    """Send logging and stderr (tqdm progress bars, warnings) to `log_path`."""
    stream = open(log_path, "a", buffering=1)
    sys.stderr = stream
    logging.basicConfig(stream=stream, level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s", force=True)
    logging.captureWarnings(True)
    return logging.getLogger("madflow")
