"""Resume state and the training log.

``out_dir/checkpoints/last.pt`` holds everything a resumed run needs: the objective's
modules and optimiser, the RNG states, the next step and the log rows so far. Batches are
a pure function of (seed, step, rank), so nothing of the data loader needs saving, and a
killed and resumed run ends with the same weights as an uninterrupted one (same device,
same thread count). The log rows live in the checkpoint too: Snakemake deletes a failed
job's declared outputs, the log among them.
"""

from __future__ import annotations

import csv
import os
import random

import numpy as np
import torch

from madflow.model import atomic_torch_save

LOG_COLUMNS = ["step", "pair", "loss", "lr", "wd", "momentum", "teacher_temp", "teacher_entropy",
               "kl_teacher_student", "prototypes_used", "mag_offset", "seconds"]


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        try:
            torch.cuda.set_rng_state_all(state["cuda"])
        except Exception:  # noqa: BLE001 - a different GPU count: CUDA streams restart
            pass


def save_checkpoint(path: str, state: dict) -> None:
    atomic_torch_save({**state, "rng": rng_state()}, path)


def load_checkpoint(path: str) -> dict | None:
    """The checkpoint at ``path`` with the RNG states restored, or None when there is none."""
    if not os.path.isfile(path):
        return None
    checkpoint = torch.load(path, map_location="cpu", weights_only=False)
    set_rng_state(checkpoint["rng"])
    return checkpoint


def format_value(value) -> str:
    return f"{value:.6g}" if isinstance(value, float) else str(value)


class TrainLog:
    """``train_log.tsv``: one row per step (``LOG_COLUMNS``; a column an objective does not
    report stays empty), rewritten from the checkpoint's rows on resume."""

    def __init__(self, path: str, enabled: bool = True):
        self.path = path
        self.enabled = enabled
        self.rows: list[list[str]] = []
        self._file = None
        self._writer = None

    def start(self, start_step: int, rows: list[list[str]] | None = None) -> None:
        """A fresh log holding the rows of steps < start_step (from the checkpoint)."""
        self.rows = [list(r) for r in (rows or []) if int(r[0]) < start_step]
        if not self.enabled:
            return
        lines = ["\t".join(LOG_COLUMNS)] + ["\t".join(r) for r in self.rows]
        tmp = self.path + ".tmp"
        with open(tmp, "w") as f:
            f.write("\n".join(lines) + "\n")
        os.replace(tmp, self.path)
        self._file = open(self.path, "a", newline="")
        self._writer = csv.writer(self._file, delimiter="\t", lineterminator="\n")

    def append(self, row: dict) -> None:
        self.rows.append([format_value(row[c]) if c in row else "" for c in LOG_COLUMNS])
        if self._writer:
            self._writer.writerow(self.rows[-1])
            self._file.flush()

    def close(self) -> None:
        if self._file:
            self._file.close()
            self._file = self._writer = None
