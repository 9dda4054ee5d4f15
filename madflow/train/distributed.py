"""Process group set-up for torchrun (WORLD_SIZE/RANK/LOCAL_RANK) and its small helpers.

On one node or several: torchrun gives every process its global RANK, its LOCAL_RANK on its
node (its GPU) and the WORLD_SIZE. A collective that waits on a rank that died or hangs fails
after ``MADFLOW_DIST_TIMEOUT_S`` seconds (default 600) instead of waiting until the job's
wall-time limit; a rank that dies outright ends its torchrun agent at once, and under Slurm
(``srun --kill-on-bad-exit``) the whole job with it.
"""

from __future__ import annotations

import os
from datetime import timedelta

import torch
import torch.distributed as dist


def setup_distributed(device: str) -> tuple[int, int, torch.device]:
    """-> (world size, rank, device); joins the process group when launched by torchrun."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise RuntimeError("device 'cuda' requested but CUDA is not available")
        if world > 1 or device == "cuda":
            device = f"cuda:{local_rank}" if world > 1 else "cuda"
        torch.cuda.set_device(torch.device(device))
    if world > 1 and not dist.is_initialized():
        timeout = timedelta(seconds=float(os.environ.get("MADFLOW_DIST_TIMEOUT_S", "600")))
        dist.init_process_group(backend="nccl" if device.startswith("cuda") else "gloo", timeout=timeout)
    return world, rank, torch.device(device)


def all_reduce_mean(x: torch.Tensor, world: int) -> torch.Tensor:
    if world > 1:
        x = x.clone()
        dist.all_reduce(x)
        x /= world
    return x


def all_reduce_sum(x: torch.Tensor, world: int) -> torch.Tensor:
    if world > 1:
        dist.all_reduce(x)
    return x


def finish_distributed(world: int) -> None:
    if world > 1 and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
