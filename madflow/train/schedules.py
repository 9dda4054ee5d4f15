"""Per-step schedules of training hyper-parameters (arrays indexed by step)."""

from __future__ import annotations

import numpy as np


def cosine(start: float, end: float, n: int) -> np.ndarray:
    """``n`` values from ``start`` to ``end`` on a half cosine."""
    n = max(int(n), 1)
    t = np.arange(n) / max(n - 1, 1)
    return end + 0.5 * (start - end) * (1 + np.cos(np.pi * t))


def lr_schedule(lr: float, min_lr: float, warmup: int, total: int) -> np.ndarray:
    """Linear warm-up to ``lr`` over ``warmup`` steps, then a cosine down to ``min_lr``."""
    total = max(int(total), 1)
    warmup = int(min(max(warmup, 0), total))
    s = np.empty(total, dtype=np.float64)
    if warmup:
        s[:warmup] = lr * (np.arange(warmup) + 1) / warmup
    if total > warmup:
        s[warmup:] = cosine(lr, min_lr, total - warmup)
    return s


def start_end(value, name: str) -> tuple[float, float]:
    """A setting given as one number (constant) or as [start, end]."""
    if isinstance(value, (int, float)):
        return float(value), float(value)
    if len(value) != 2:
        raise ValueError(f"train.{name} must be a number or [start, end]")
    return float(value[0]), float(value[1])


def cosine_setting(train_cfg: dict, name: str, total: int) -> np.ndarray:
    """The per-step values of a number-or-[start, end] setting, on a cosine over training."""
    return cosine(*start_end(train_cfg[name], name), total)
