"""The cluster path for real: `snakemake tiles --profile .ci/slurm-profile` on a Slurm of two
nodes on this host (the production profile slurm/ differs only in its status checks: see its
comments), then a pretraining over both nodes (`resources: {pretrain: {nodes: 2}}`): one Slurm
job, srun starting a torchrun agent on each node, a c10d rendezvous on the job's first node.

The session fixture starts Slurm with `.ci/slurm.sh start` (root; installs slurm-wlm and munge
with apt-get if missing). If that is impossible the tests are skipped with the script's reason
(`pytest -ra` prints it); set MADFLOW_REQUIRE_SLURM=1 to turn that skip into a failure (CI).

Run with the project's virtualenv, e.g.
    PATH=$PWD/.venv/bin:$PATH .venv/bin/python -m pytest -m slurm tests/test_slurm.py
Slurm jobs inherit this environment (sbatch --export=ALL) and re-run Snakemake inside the job,
so the venv's bin/ is put first on PATH here as well.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

pytestmark = pytest.mark.slurm

REPO = Path(__file__).resolve().parents[1]
SLURM_SH = REPO / ".ci" / "slurm.sh"
SLURM_DIR = Path(os.environ.get("MADFLOW_SLURM_DIR", "/tmp/madflow-slurm"))
SMALL_CONFIG = REPO / "tests" / "config_small.yaml"
# what a copy of the workflow needs (tests/config_small.yaml is copied when present)
WORKFLOW_PARTS = [
    "Snakefile",
    "rules",
    "config.yaml",
    "schemas",
    "envs",
    "workflow_scripts",
    "madflow",
    "slurm",
    ".ci",
    "pyproject.toml",
]
FALLBACK_DEMO = {"n_slides": 3, "size": 2048, "n_test": 1}
RUN_TIMEOUT_S = 600
PROFILE = ".ci/slurm-profile"  # squeue status checks: the test cluster has no accounting
SUBMITTED_RE = re.compile(
    r"Job \d+ has been submitted with SLURM jobid (\d+) \(log: ([^)]*)\)"
)
RUN_ID_RE = re.compile(r"SLURM run ID: (\S+)")
NODES = 2  # .ci/slurm.sh runs this many slurmd on this host, each with one fake GPU
# a pretraining over every node, one GPU per node as a cluster job asks for it (--gres=gpu:1
# --cpus-per-gpu=1); the GPUs are fake, so each process trains on CPU (gloo), with a head
# without batch norm (SyncBatchNorm, what DDP makes of it, needs CUDA)
TWO_NODE_CONFIG = {
    "resources": {"pretrain": {"nodes": NODES, "gpu": 1, "cpus_per_gpu": 1, "mem_mb": 1000, "runtime": 10}},
    "model": {"head": {"use_bn": False}},
    "train": {"steps": 4, "checkpoint_every": 2},
    "experiments": {"base": {"steps": 4}},
}


def _env() -> dict[str, str]:
    """Environment with the venv first on PATH, for Snakemake and (inherited) its jobs."""
    env = dict(os.environ)
    bins = [Path(sys.executable).parent, REPO / ".venv" / "bin"]
    path = [str(b) for b in bins if b.is_dir()]
    env["PATH"] = os.pathsep.join(path + [env.get("PATH", "")])
    env["MADFLOW_SLURM_NODES"] = str(NODES)
    env["MADFLOW_SLURM_GPUS"] = "1"
    conf = SLURM_DIR / "etc" / "slurm.conf"
    if conf.is_file() and "SLURM_CONF" not in env:
        env["SLURM_CONF"] = str(conf)
    # never let an outer Slurm job's variables leak into submissions
    for key in [k for k in env if k.startswith("SLURM_") and k != "SLURM_CONF"]:
        del env[key]
    return env


def _snakemake() -> list[str]:
    exe = Path(sys.executable).parent / "snakemake"
    if exe.is_file():
        return [str(exe)]
    found = shutil.which("snakemake")
    if not found:
        pytest.skip("snakemake is not installed in this Python environment")
    return [found]


def _sh(cmd: list[str], timeout: int = 30, **kw) -> subprocess.CompletedProcess:
    return subprocess.run(
        cmd, capture_output=True, text=True, timeout=timeout, env=_env(), **kw
    )


def _unavailable(reason: str):
    if os.environ.get("MADFLOW_REQUIRE_SLURM") == "1":
        pytest.fail(f"Slurm required (MADFLOW_REQUIRE_SLURM=1) but {reason}")
    pytest.skip(reason)


@pytest.fixture(scope="session")
def slurm_cluster():
    """A running single-node Slurm; stopped afterwards if this fixture started it."""
    if shutil.which("timeout") is None or shutil.which("bash") is None:
        _unavailable("needs bash and coreutils timeout")
    before = _sh(["bash", str(SLURM_SH), "status"], timeout=60)
    was_running = before.returncode == 0
    t0 = time.monotonic()
    try:
        # apt-get install may take a few minutes on a fresh machine
        res = _sh(
            ["timeout", "-k", "10", "900", "bash", str(SLURM_SH), "start"], timeout=930
        )
    except subprocess.TimeoutExpired:
        _unavailable(".ci/slurm.sh start did not finish within 930 s")
    if res.returncode != 0:
        msg = (res.stderr.strip() or res.stdout.strip()).splitlines()
        _unavailable(
            "cannot start Slurm (.ci/slurm.sh start exit "
            f"{res.returncode}): {' | '.join(msg[-5:]) or 'no output'}"
        )
    start_s = time.monotonic() - t0
    print(
        f"\nSlurm ready in {start_s:.1f} s ({'already running' if was_running else 'started'})"
    )
    yield {"start_s": start_s, "was_running": was_running}
    if not was_running:
        _sh(["timeout", "-k", "5", "60", "bash", str(SLURM_SH), "stop"], timeout=70)


def _copy_workflow(dest: Path) -> None:
    if not (REPO / "Snakefile").is_file():
        pytest.skip("no Snakefile in the repository yet")
    for part in WORKFLOW_PARTS:
        src = REPO / part
        if src.is_dir():
            shutil.copytree(
                src,
                dest / part,
                ignore=shutil.ignore_patterns("__pycache__", "*.pyc", ".snakemake"),
            )
        elif src.is_file():
            shutil.copy2(src, dest / part)
    if SMALL_CONFIG.is_file():
        (dest / "tests").mkdir(exist_ok=True)
        shutil.copy2(SMALL_CONFIG, dest / "tests" / SMALL_CONFIG.name)


def _config_args(work: Path) -> tuple[list[str], int | None]:
    """Snakemake arguments selecting the small test config, and the demo slide count."""
    if SMALL_CONFIG.is_file():
        small = yaml.safe_load(SMALL_CONFIG.read_text()) or {}
        n = (small.get("demo") or {}).get("n_slides")
        return ["--configfile", f"tests/{SMALL_CONFIG.name}"], n
    # a config file, not --config: nested --config values arrive as strings
    (work / "tests").mkdir(exist_ok=True)
    (work / "tests" / "config_slurm.yaml").write_text(
        yaml.safe_dump({"demo": FALLBACK_DEMO})
    )
    return ["--configfile", "tests/config_slurm.yaml"], FALLBACK_DEMO["n_slides"]


def _scontrol_job(job_id: str) -> dict[str, str]:
    res = _sh(["scontrol", "-o", "show", "job", job_id])
    if res.returncode != 0:
        return {}
    fields = {}
    for token in res.stdout.split():
        key, sep, value = token.partition("=")
        if sep and key not in fields:
            fields[key] = value
    return fields


@pytest.fixture(scope="session")
def slurm_tiles_run(slurm_cluster, tmp_path_factory):
    """`snakemake tiles --profile .ci/slurm-profile` in a temporary copy of the repository."""
    work = tmp_path_factory.mktemp("slurm_wf")
    _copy_workflow(work)
    config_args, n_slides = _config_args(work)
    t0 = time.monotonic()
    # the target first: --configfile takes every following word
    rc, out = _run_snakemake(work, "tiles", *config_args)
    wall_s = time.monotonic() - t0
    (work / "snakemake_slurm.log").write_text(out)
    run_id = RUN_ID_RE.search(out)
    print(
        f"\nsnakemake tiles --profile {PROFILE}: exit {rc} in {wall_s:.1f} s (dir {work})"
    )
    return {
        "rc": rc,
        "log": out,
        "wall_s": wall_s,
        "work": work,
        "n_slides": n_slides,
        "submitted": SUBMITTED_RE.findall(out),
        "run_id": run_id.group(1) if run_id else None,
        "config_args": config_args,
    }


def _run_snakemake(work: Path, *args: str) -> tuple[int, str]:
    """Snakemake with the test profile in `work`, bounded by RUN_TIMEOUT_S; its queued jobs
    are cancelled if it fails."""
    cmd = ["timeout", "-k", "10", str(RUN_TIMEOUT_S), *_snakemake(), *args, "--profile", PROFILE,
           "--slurm-keep-successful-logs"]  # keep per-job logs as evidence
    try:
        res = _sh(cmd, timeout=RUN_TIMEOUT_S + 30, cwd=work)
        rc, out = res.returncode, res.stdout + res.stderr
    except subprocess.TimeoutExpired as exc:
        rc, out = 124, f"{exc.stdout or ''}{exc.stderr or ''}"
    run_id = RUN_ID_RE.search(out)
    if rc != 0 and run_id:  # do not leave jobs of a failed/killed run queued
        _sh(["scancel", "--name", run_id.group(1)])
    return rc, out


def _tail(text: str, n: int = 60) -> str:
    return "\n".join(text.splitlines()[-n:])


def _failed_job_logs(work: Path) -> str:
    logs = sorted((work / ".snakemake" / "slurm_logs").rglob("*.log"))
    return "\n".join(
        f"--- {p}\n{_tail(p.read_text(errors='replace'), 30)}" for p in logs[-3:]
    )


def test_tiles_run_succeeds_through_slurm(slurm_tiles_run):
    run = slurm_tiles_run
    if run["rc"] == 124 or run["rc"] == 137:
        pytest.fail(
            f"snakemake --profile {PROFILE} timed out after {RUN_TIMEOUT_S} s\n{_tail(run['log'])}"
        )
    assert run["rc"] == 0, (
        f"snakemake tiles --profile {PROFILE} exited {run['rc']}\n{_tail(run['log'])}\n"
        f"{_failed_job_logs(run['work'])}"
    )
    assert f"Using profile {PROFILE}" in run["log"], f"the {PROFILE} profile was not picked up"
    assert run["run_id"], "no 'SLURM run ID' in the log: the slurm executor did not run"
    assert run["submitted"], "no job was submitted to Slurm:\n" + _tail(run["log"])


def test_tile_tables_exist(slurm_tiles_run):
    run = slurm_tiles_run
    if run["rc"] != 0:
        pytest.skip("the Slurm run failed (see test_tiles_run_succeeds_through_slurm)")
    tables = sorted((run["work"] / "results" / "tiles").glob("*.parquet"))
    assert tables, "no results/tiles/*.parquet after `snakemake tiles`"
    if run["n_slides"]:
        assert len(tables) == run["n_slides"], [t.name for t in tables]
    pd = pytest.importorskip("pandas")
    rows = 0
    for table in tables:
        rows += len(pd.read_parquet(table))
    assert rows > 0, "all tile tables are empty"
    # nothing left to do for the target: the run really completed it
    dry = _sh(
        [*_snakemake(), "tiles", "-n", "--cores", "1", *run["config_args"]],
        timeout=120,
        cwd=run["work"],
    )
    assert dry.returncode == 0, dry.stdout + dry.stderr
    assert "Nothing to be done" in dry.stdout + dry.stderr, _tail(
        dry.stdout + dry.stderr
    )


def test_jobs_really_ran_in_slurm(slurm_tiles_run):
    run = slurm_tiles_run
    if run["rc"] != 0:
        pytest.skip("the Slurm run failed (see test_tiles_run_succeeds_through_slurm)")
    rules_seen = []
    for job_id, logfile in run["submitted"]:
        # slurmctld keeps finished jobs for MinJobAge=300 s: each must be known and COMPLETED
        info = _scontrol_job(job_id)
        assert info, f"Slurm does not know job {job_id}"
        assert info.get("JobState") == "COMPLETED", (job_id, info.get("JobState"))
        assert info.get("JobName") == run["run_id"], (job_id, info.get("JobName"))
        comment = info.get("Comment", "")
        match = re.match(r"rule_(\w+?)(?:_wildcards_|$)", comment)
        assert match, f"job {job_id}: unexpected comment {comment!r}"
        rules_seen.append(match.group(1))
        # the plugin's per-job log (kept by --slurm-keep-successful-logs)
        log = Path(logfile)
        assert log.is_file(), f"missing Slurm log {log}"
        assert log.is_relative_to(run["work"] / ".snakemake" / "slurm_logs"), log
    assert "tile" in rules_seen, f"no `tile` job went through Slurm: {rules_seen}"
    if run["n_slides"]:
        assert rules_seen.count("tile") == run["n_slides"], rules_seen
    assert (run["work"] / ".snakemake" / "slurm_logs" / "rule_tile").is_dir()


@pytest.fixture(scope="session")
def slurm_pretrain_run(slurm_tiles_run):
    """After the tiles: stage 1 (`base`) pretrained over both nodes of the test cluster."""
    run = slurm_tiles_run
    if run["rc"] != 0:
        pytest.skip("the Slurm tiles run failed (see test_tiles_run_succeeds_through_slurm)")
    work = run["work"]
    (work / "tests" / "config_two_nodes.yaml").write_text(yaml.safe_dump(TWO_NODE_CONFIG))
    t0 = time.monotonic()
    rc, out = _run_snakemake(work, "results/base/seed0/encoder.pt", *run["config_args"],
                             "tests/config_two_nodes.yaml")
    wall_s = time.monotonic() - t0
    (work / "snakemake_slurm_pretrain.log").write_text(out)
    print(f"\ntwo-node pretraining through Slurm: exit {rc} in {wall_s:.1f} s (dir {work})")
    return {"rc": rc, "log": out, "work": work, "submitted": SUBMITTED_RE.findall(out)}


def test_pretraining_over_two_nodes(slurm_pretrain_run):
    run = slurm_pretrain_run
    work = run["work"]
    assert run["rc"] == 0, f"{_tail(run['log'])}\n{_failed_job_logs(work)}"
    jobs = {job_id: _scontrol_job(job_id) for job_id, _ in run["submitted"]}
    pretrain = [(job_id, info) for job_id, info in jobs.items()
                if info.get("Comment", "").startswith("rule_pretrain")]
    assert len(pretrain) == 1, jobs
    job_id, info = pretrain[0]
    # one Slurm job over both nodes, one task (a torchrun agent) and one GPU on each
    assert info["JobState"] == "COMPLETED" and info["NumNodes"] == str(NODES), info
    assert info["NumTasks"] == str(NODES) and info["TresPerNode"] == "gres:gpu:1", info
    res = work / "results" / "base" / "seed0"
    # one process group over the two agents
    checkpoint = torch.load(res / "checkpoints" / "last.pt", map_location="cpu", weights_only=False)
    assert checkpoint["world_size"] == NODES and checkpoint["step"] == TWO_NODE_CONFIG["train"]["steps"]
    assert (res / "encoder.pt").is_file()
    # the command the job ran
    slurm_log = next((work / ".snakemake" / "slurm_logs" / "rule_pretrain").rglob(f"{job_id}.log")).read_text()
    assert f"srun --nodes={NODES} --ntasks={NODES} --ntasks-per-node=1 --cpus-per-task=1" in slurm_log, \
        slurm_log[-3000:]
    assert f"torchrun --nnodes={NODES} --nproc_per_node=1 --rdzv_backend=c10d" in slurm_log
    assert "--rdzv_id=$SLURM_JOB_ID" in slurm_log
