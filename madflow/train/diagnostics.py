"""The cross-scale cue at the start of cross-scale training: is the objective learnable?

For each pair a->b, the teacher's distribution of a parent is compared with the student's
distribution of (i) the parent's own children and (ii) the children of a random other parent
(the shuffled ablation's sampler draws the same parents, so the comparison is paired).
gap = CE(own) - CE(other), per parent, averaged: below 0 the network, as it starts, already
predicts a parent from its own children better than from unrelated ones; about 0 means no
cue for the objective to follow. Measured on a copy of the network in the modes training
uses (batch statistics as in training; on a copy where the network has batch norm, whose
statistics train mode would update), so it changes nothing of the run.
"""

from __future__ import annotations

import copy

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F

from madflow.data.dataset import MADBatchDataset
from madflow.data.sampling import group_weights

CUE_COLUMNS = ["pair", "n_parents", "ce_own", "ce_other", "gap", "ci_low", "ci_high"]


def _per_parent_ce(objective, batch: dict, step: int) -> np.ndarray:
    model, device = objective.model, objective.device
    B, V = batch["student"].shape[:2]
    with objective.autocast:
        teacher = model.teacher(batch["teacher"].to(device)).float()
        student = model.student(batch["student"].flatten(0, 1).to(device)).float().view(B, V, -1)
    target = objective.loss.teacher_probs(teacher, step)
    log_s = F.log_softmax(student / objective.loss.student_temp, dim=-1)
    return (-(target.unsqueeze(1) * log_s).sum(-1)).mean(1).cpu().numpy()


@torch.no_grad()
def cross_scale_cue(objective, index, pairs: dict, n_local: int, seed: int, augmenter, reader_factory=None,
                    n_batches: int = 8, batch_parents: int = 32, n_boot: int = 1000) -> pd.DataFrame:
    """One row per pair: mean CE to own and to other children, their gap and its 95%
    bootstrap CI over parents."""
    probe = copy.copy(objective)
    if any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in objective.model.modules()):
        probe.model = copy.deepcopy(objective.model)  # train-mode batch norm updates its statistics
    probe.train_mode()
    rows = []
    for pair in group_weights("mad", pairs):
        ce = {}
        for mode in ("mad", "shuffled"):
            ds = MADBatchDataset(index, mode, {pair: 1.0}, batch_parents, n_local, seed, n_batches,
                                 parent_view=False, augmenter=augmenter, reader_factory=reader_factory)
            ce[mode] = np.concatenate([_per_parent_ce(probe, ds.batch_for_step(s), 0) for s in range(n_batches)])
        gap = ce["mad"] - ce["shuffled"]
        rng = np.random.default_rng([seed, 0xC0E])
        boot = gap[rng.integers(len(gap), size=(n_boot, len(gap)))].mean(1)
        rows.append([pair, len(gap), ce["mad"].mean(), ce["shuffled"].mean(), gap.mean(),
                     *np.quantile(boot, [0.025, 0.975])])
    return pd.DataFrame(rows, columns=CUE_COLUMNS)
