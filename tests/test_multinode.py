"""Training over several nodes, simulated on this machine with the real launcher: torchrun
agents meeting at a c10d rendezvous on localhost, gloo on CPU, the pretrain rule's command
(``python -m madflow.train``) reading a real pyramidal TIFF.

- two agents (``--nnodes=2 --nproc_per_node=1``) end with the same weights, optimiser state
  and log as one agent of two processes (``--standalone --nproc_per_node=2``);
- a rank killed with SIGKILL ends the run within a bounded time, and the run resumes from
  its last checkpoint at another world size (2 -> 1) with the same step, schedules, teacher
  and optimiser state;
- a rank that hangs (SIGSTOP) ends the run once the process-group timeout
  (MADFLOW_DIST_TIMEOUT_S) has passed;
- activation checkpointing (what lets ViT-g fit a GPU) changes memory, not results.
"""

import json
import os
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pandas as pd
import torch

from test_train import _train_tables, slides, tiff_slide, tiny_cfg  # noqa: F401 - fixtures

from madflow.train.schedules import cosine_setting, lr_schedule


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def write_config(path, **train) -> str:
    path.write_text(json.dumps(tiny_cfg(**train)))
    return str(path)


def trainer(config: str, table: str, out, *launch: str) -> list[str]:
    """The pretrain rule's command: ``python -m madflow.train``, under torchrun when ``launch``
    holds torchrun's options."""
    python = [sys.executable, "-m", "torch.distributed.run", *launch] if launch else [sys.executable]
    return [*python, "-m", "madflow.train", "--config", config, "--experiment", "mad", "--tables", table,
            "--out", str(out), "--seed", "0", "--device", "cpu"]


def start(cmd: list[str], **env_vars: str) -> subprocess.Popen:
    """``cmd`` at the lowest priority (nice execs: the process is cmd's own), one thread."""
    env = dict(os.environ, OMP_NUM_THREADS="1", **env_vars)
    return subprocess.Popen(["nice", "-n", "19", *cmd], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)


def finish(procs: list[subprocess.Popen], timeout: float = 240) -> list[str]:
    outs = [p.communicate(timeout=timeout)[0] for p in procs]
    for p, out in zip(procs, outs):
        assert p.returncode == 0, out[-4000:]
    return outs


def checkpoint(out) -> dict:
    return torch.load(out / "checkpoints" / "last.pt", map_location="cpu", weights_only=False)


def parameters(state: dict) -> dict:
    return {k: v for k, v in state.items() if not k.endswith(("running_mean", "running_var", "num_batches_tracked"))}


def test_two_agents_match_one_agent_of_the_same_world_size(tiff_slide, tmp_path):  # noqa: F811
    table, _ = tiff_slide
    config = write_config(tmp_path / "config.json", steps=4, checkpoint_every=0)
    rdzv = ["--nnodes=2", "--nproc_per_node=1", "--rdzv_backend=c10d",
            f"--rdzv_endpoint=localhost:{free_port()}", "--rdzv_id=madflow-test", "--max_restarts=0"]
    finish([start(trainer(config, table, tmp_path / "nodes2", *rdzv)) for _ in range(2)])
    finish([start(trainer(config, table, tmp_path / "node1", "--standalone", "--nproc_per_node=2"))])
    a, b = checkpoint(tmp_path / "nodes2"), checkpoint(tmp_path / "node1")
    assert a["world_size"] == b["world_size"] == 2 and a["step"] == b["step"] == 4
    # the same batch on each rank and an all-reduce of two ranks (a + b = b + a): bitwise equal
    for part in ("student", "teacher", "loss"):
        for k in b[part]:
            assert torch.equal(a[part][k], b[part][k]), (part, k)
    assert len(a["optimizer"]["state"]) == len(b["optimizer"]["state"]) > 0
    for sa, sb in zip(a["optimizer"]["state"].values(), b["optimizer"]["state"].values()):
        assert all(torch.equal(sa[k], sb[k]) for k in sb)
    assert [r[:-1] for r in a["log_rows"]] == [r[:-1] for r in b["log_rows"]]  # all but the seconds


def workers(agent_pid: int) -> list[int]:
    """The training processes torchrun started."""
    with open(f"/proc/{agent_pid}/task/{agent_pid}/children") as f:
        pids = [int(c) for c in f.read().split()]
    found = []
    for pid in pids:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            if b"madflow.train" in f.read():
                found.append(pid)
    return found


def wait_for_checkpoint(agent: subprocess.Popen, out) -> None:
    last = out / "checkpoints" / "last.pt"
    deadline = time.monotonic() + 180
    while not last.exists() and agent.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert last.exists() and agent.poll() is None, "no checkpoint while the run was going"


def test_hung_rank_ends_the_run_after_the_timeout(tiff_slide, tmp_path):  # noqa: F811
    table, _ = tiff_slide
    config = write_config(tmp_path / "config.json", steps=200, checkpoint_every=1)
    out = tmp_path / "run"
    agent = start(trainer(config, table, out, "--standalone", "--nproc_per_node=2", "--max_restarts=0"),
                  MADFLOW_DIST_TIMEOUT_S="5")
    wait_for_checkpoint(agent, out)
    ranks = workers(agent.pid)
    os.kill(ranks[-1], signal.SIGSTOP)  # alive, never answering
    t0 = time.monotonic()
    try:
        log = agent.communicate(timeout=120)[0]
    finally:
        for pid in ranks:  # a stopped process outlives its agent's SIGTERM
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
    ended_s = time.monotonic() - t0
    print(f"rank 1 stopped: the run ended {ended_s:.1f} s later (exit {agent.returncode})")
    assert agent.returncode != 0 and "timed out" in log.lower(), log[-3000:]
    assert ended_s < 90


def test_rank_killed_then_resumed_at_another_world_size(tiff_slide, tmp_path):  # noqa: F811
    table, _ = tiff_slide
    steps = 60
    config = write_config(tmp_path / "config.json", steps=steps, checkpoint_every=1)
    out = tmp_path / "run"
    agent = start(trainer(config, table, out, "--standalone", "--nproc_per_node=2", "--max_restarts=0"))
    wait_for_checkpoint(agent, out)
    ranks = workers(agent.pid)
    assert len(ranks) == 2, ranks
    os.kill(ranks[-1], signal.SIGKILL)
    t0 = time.monotonic()
    log = agent.communicate(timeout=120)[0]
    ended_s = time.monotonic() - t0
    assert agent.returncode != 0, log[-3000:]
    assert ended_s < 60, f"the run took {ended_s:.0f} s to end after a rank died"
    print(f"rank 1 killed: the run ended {ended_s:.1f} s later (exit {agent.returncode})")
    killed = checkpoint(out)
    k = killed["step"]
    assert killed["world_size"] == 2 and 0 < k < steps - 1
    assert not (out / "encoder.pt").exists()
    env = dict(os.environ, OMP_NUM_THREADS="1")
    # resume with one process for one step: the teacher is the checkpoint's, moved by one EMA step
    one = subprocess.run(["nice", "-n", "19", *trainer(config, table, out), "--stop-after", str(k + 1)],
                         capture_output=True, text=True, timeout=240, env=env)
    assert one.returncode == 0, one.stderr[-4000:]
    assert f"resuming from step {k}" in one.stderr and "world size 2 at world size 1" in one.stderr
    after = checkpoint(out)
    assert after["step"] == k + 1 and after["world_size"] == 1
    cfg = tiny_cfg(steps=steps)["train"]
    m = float(cosine_setting(cfg, "momentum", steps)[k])
    for name, t in parameters(killed["teacher"]).items():
        want = t.mul(m).add(after["student"][name], alpha=1 - m)
        assert torch.allclose(after["teacher"][name], want, rtol=0, atol=1e-6), name
    # ... then to the end: every step logged once, the schedules of the whole run, the optimiser
    # state carried over (one AdamW step per training step)
    rest = subprocess.run(["nice", "-n", "19", *trainer(config, table, out)], capture_output=True, text=True,
                          timeout=240, env=env)
    assert rest.returncode == 0, rest.stderr[-4000:]
    final = checkpoint(out)
    assert final["step"] == steps and (out / "encoder.pt").exists()
    assert final["log_rows"][:k] == killed["log_rows"]
    train_log = pd.read_csv(out / "train_log.tsv", sep="\t")
    assert train_log.step.tolist() == list(range(steps))
    lr = lr_schedule(cfg["lr"], cfg["min_lr"], int(round(cfg["warmup_frac"] * steps)), steps)
    assert np.allclose(train_log.lr, lr, rtol=1e-5)
    assert np.allclose(train_log.wd, cosine_setting(cfg, "weight_decay", steps), rtol=1e-5)
    assert np.allclose(train_log.momentum, cosine_setting(cfg, "momentum", steps), rtol=1e-5)
    # (the prototypes' last layer sits out its frozen first steps)
    adam_steps = {int(s["step"]) for s in final["optimizer"]["state"].values()}
    assert adam_steps == {steps, steps - cfg["freeze_last_layer_steps"]}


def test_global_batch_must_split_over_the_ranks(tiff_slide, tmp_path):  # noqa: F811
    table, _ = tiff_slide
    config = write_config(tmp_path / "config.json", steps=2, checkpoint_every=0)
    p = subprocess.run(["nice", "-n", "19", *trainer(config, table, tmp_path / "out", "--standalone",
                                                      "--nproc_per_node=3")],
                       capture_output=True, text=True, timeout=240, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert p.returncode != 0 and "not divisible by the world size 3" in p.stdout + p.stderr


def test_activation_checkpointing_changes_memory_not_results(slides, tmp_path):  # noqa: F811
    plain = _train_tables(tiny_cfg(steps=3, checkpoint_every=0), slides, str(tmp_path / "plain"))["model"]
    ckpt = _train_tables(tiny_cfg(steps=3, checkpoint_every=0, activation_checkpointing=True), slides,
                         str(tmp_path / "ckpt"))["model"]
    # the student's backbone recomputes its blocks in the backward; the teacher has no backward
    assert ckpt.student.backbone.grad_checkpointing and not ckpt.teacher.backbone.grad_checkpointing
    assert not plain.student.backbone.grad_checkpointing
    for net in ("student", "teacher"):
        a, b = getattr(plain, net).state_dict(), getattr(ckpt, net).state_dict()
        for k in a:
            assert torch.equal(a[k], b[k]), (net, k)
