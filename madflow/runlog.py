"""Per-job logging for the workflow's scripts: everything, progress bars included, goes to
the rule's log file under results/logs/ instead of the terminal."""

from __future__ import annotations

import logging
import sys
import time


def setup(log_path: str) -> logging.Logger:
    """Send logging and stderr (tqdm progress bars, warnings) to `log_path`."""
    stream = open(log_path, "a", buffering=1)
    sys.stderr = stream
    logging.basicConfig(stream=stream, level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s", force=True)
    logging.captureWarnings(True)
    log = logging.getLogger("madflow")
    log_startup(log)
    return log


def log_startup(log: logging.Logger) -> None:
    """Log the CPU time the job has used so far (interpreter start and imports), which the
    demo's profile (bench/profile_demo.py) counts as per-job overhead."""
    log.info("startup %.2f CPU s (interpreter start and imports)", time.process_time())
