"""DINO loss for MAD (teacher parent -> student children), centring, KoLeo."""
from __future__ import annotations

import math
from typing import Callable, Sequence

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

__all__ = ["DINOLoss", "koleo_loss", "teacher_temp_schedule"]


def teacher_temp_schedule(start: float, end: float, warmup_steps: int, total_steps: int) -> np.ndarray:
    """Linear warm-up from ``start`` to ``end`` over ``warmup_steps``, then constant."""
    total_steps = max(int(total_steps), 1)
    warmup_steps = int(min(max(warmup_steps, 0), total_steps))
    sched = np.full(total_steps, float(end), dtype=np.float64)
    if warmup_steps > 0:
        sched[:warmup_steps] = np.linspace(float(start), float(end), warmup_steps)
    return sched


def _dist_on() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


class DINOLoss(nn.Module):
    """Cross-entropy between the centred, sharpened teacher distribution of the parent and
    the student distribution of each child view.

    ``forward(student_out [B, V, K], teacher_out [B, K], step)`` returns the scalar loss
    ``mean_{b,v} sum_k -softmax((t_b - c) / tau_t)_k * log_softmax(s_{b,v} / tau_s)_k``
    and updates the EMA centre ``c`` from the teacher outputs (all-reduced under DDP).
    """

    def __init__(self, out_dim: int, student_temp: float = 0.1,
                 teacher_temp_schedule: float | Sequence[float] | Callable[[int], float] = 0.04,
                 center_momentum: float = 0.9, centering: str = "ema", sinkhorn_iterations: int = 3):
        super().__init__()
        if centering not in ("ema", "sinkhorn"):
            raise ValueError(f"centering must be 'ema' or 'sinkhorn', got {centering!r}")
        self.centering = centering
        self.sinkhorn_iterations = int(sinkhorn_iterations)
        self.out_dim = int(out_dim)
        self.student_temp = float(student_temp)
        self.center_momentum = float(center_momentum)
        self._tt = teacher_temp_schedule
        self.register_buffer("center", torch.zeros(1, self.out_dim))
        self.last_stats: dict = {}

    def teacher_temp(self, step: int) -> float:
        tt = self._tt
        if callable(tt):
            return float(tt(step))
        if isinstance(tt, (int, float)):
            return float(tt)
        tt = list(tt) if not isinstance(tt, np.ndarray) else tt
        return float(tt[min(int(step), len(tt) - 1)])

    def teacher_probs(self, teacher_out: torch.Tensor, step: int) -> torch.Tensor:
        if self.centering == "sinkhorn":
            return self.sinkhorn_knopp(teacher_out, self.teacher_temp(step))
        return F.softmax((teacher_out.float() - self.center) / self.teacher_temp(step), dim=-1)

    @torch.no_grad()
    def sinkhorn_knopp(self, teacher_out: torch.Tensor, temp: float) -> torch.Tensor:
        """Sinkhorn-Knopp teacher (SwAV / DINOv2 alternative to the EMA centre): rows are
        distributions, prototypes get equal mass over the (global) batch."""
        t = teacher_out.detach().float()
        mx = t.max()
        if _dist_on():
            dist.all_reduce(mx, op=dist.ReduceOp.MAX)
        Q = torch.exp((t - mx) / temp).t()  # [K, B]
        K, Bl = Q.shape
        Bg = Bl * (dist.get_world_size() if _dist_on() else 1)
        tot = Q.sum()
        if _dist_on():
            dist.all_reduce(tot)
        Q /= tot
        for _ in range(self.sinkhorn_iterations):
            rows = Q.sum(dim=1, keepdim=True)
            if _dist_on():
                dist.all_reduce(rows)
            Q /= rows.clamp_min(1e-30)
            Q /= K
            Q /= Q.sum(dim=0, keepdim=True)
            Q /= Bg
        Q *= Bg
        return Q.t()

    def forward(self, student_out: torch.Tensor, teacher_out: torch.Tensor, step: int = 0,
                update_center: bool = True) -> torch.Tensor:
        """``teacher_out`` [B, K] (one teacher view, MAD) or [B, G, K] (multi-crop: the
        teacher's G views are the student's first G views, and a view is never its own
        target, as in DINO)."""
        if student_out.dim() == 2:
            student_out = student_out.unsqueeze(1)
        B, V, K = student_out.shape
        multi = teacher_out.dim() == 3
        G = teacher_out.shape[1] if multi else 1
        if teacher_out.shape[0] != B or teacher_out.shape[-1] != K or (multi and G > V):
            raise ValueError(f"teacher_out {tuple(teacher_out.shape)} does not match student {(B, V, K)}")
        flat = teacher_out.detach().reshape(B * G, K)
        t = self.teacher_probs(flat, step)                                      # [B*G, K]
        log_s = F.log_softmax(student_out.float() / self.student_temp, dim=-1)  # [B, V, K]
        ent = -(t * torch.log(t.clamp_min(1e-30))).sum(-1).detach()         # [B*G]
        if multi:
            ce = -(t.view(B, G, 1, K) * log_s.unsqueeze(1)).sum(-1)            # [B, G, V]
            scored = ~torch.eye(G, V, dtype=torch.bool, device=ce.device)      # not view g vs itself
            loss = ce[:, scored].mean()
            kl = (ce.detach() - ent.view(B, G, 1))[:, scored]
        else:
            ce = -(t.unsqueeze(1) * log_s).sum(-1)                             # [B, V]
            loss = ce.mean()
            kl = ce.detach() - ent.unsqueeze(1)
        self.last_stats = {
            "teacher_entropy": ent.mean(),
            # KL(teacher || student) = CE - H(teacher), averaged over the scored pairs
            "kl_teacher_student": kl.mean(),
            "teacher_argmax": t.argmax(-1).detach(),
        }
        if update_center and self.training and self.centering == "ema":
            self.update_center(flat)
        return loss

    @torch.no_grad()
    def update_center(self, teacher_out: torch.Tensor) -> None:
        t = teacher_out.detach().float()
        batch_sum = t.sum(dim=0, keepdim=True)
        n = torch.tensor([float(t.shape[0])], device=t.device)
        if _dist_on():
            dist.all_reduce(batch_sum)
            dist.all_reduce(n)
        batch_center = batch_sum / n
        self.center.mul_(self.center_momentum).add_(batch_center * (1.0 - self.center_momentum))


def koleo_loss(x: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """Kozachenko-Leonenko differential-entropy regulariser (DINOv2):
    ``-mean_i log(||x_i - x_nn(i)|| + eps)`` on L2-normalised rows of ``x`` [N, D]."""
    x = F.normalize(x.float(), dim=-1, eps=eps)
    n = x.shape[0]
    if n < 2:
        return x.sum() * 0.0
    with torch.no_grad():
        dots = x @ x.t()
        dots.fill_diagonal_(-math.inf)
        nn_idx = dots.argmax(dim=1)
    d = F.pairwise_distance(x, x[nn_idx], p=2, eps=eps)
    return -torch.log(d + eps).mean()
