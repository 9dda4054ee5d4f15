"""Threads per training job versus training jobs in parallel, on this machine's cores.

Runs real training processes (``python -m madflow.train``, as the pretrain rule does) on the
bench's demo tiles (those of bench/bench_train.py, built there when missing) in layouts that
use the same cores, e.g. on 2 cores:

  1 job x 2 threads    one training at a time with both cores (the demo's layout)
  2 jobs x 1 thread    two trainings at once, one core each (Snakemake --cores 2, threads: 1)

each with the loader in a worker process (num_workers 1) and in the training process
(num_workers 0). Layouts run interleaved, --repeats times, so background load hits all
alike. Per layout: the median seconds per step of each job (from its train_log.tsv, the
first --skip steps left out), and the aggregate training steps per second of the machine
(jobs / step seconds), the number that sets the demo's wall time.

    python bench/bench_parallel.py [--steps 40] [--repeats 3] [--experiment mad]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import pandas as pd
import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

from bench_train import build_tables  # noqa: E402


def run_layout(cfg_path: Path, experiment: str, tables: list[str], jobs: int, threads: int,
               workers: int, steps: int, workdir: Path) -> list[pd.DataFrame]:
    """Start `jobs` trainings at once with `threads` threads each; -> their train logs."""
    cfg = yaml.safe_load(cfg_path.read_text())
    cfg["train"] = {**(cfg.get("train") or {}), "num_workers": workers, "checkpoint_every": 10 ** 9}
    cfg["experiments"][experiment] = {k: v for k, v in (cfg["experiments"][experiment] or {}).items()
                                      if k != "init"}  # the bench times steps, not a stage-1 start
    run_cfg = workdir / "config.json"
    run_cfg.write_text(json.dumps(cfg))
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads),
           "PYTHONPATH": str(REPO)}
    procs, outs = [], []
    for job in range(jobs):
        out = workdir / f"job{job}"
        outs.append(out)
        cmd = [sys.executable, "-m", "madflow.train", "--config", str(run_cfg), "--experiment", experiment,
               "--tables", *tables, "--out", str(out), "--seed", str(job), "--device", "cpu",
               "--stop-after", str(steps), "--log-level", "WARNING"]
        procs.append(subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True))
    for proc in procs:
        _, err = proc.communicate()
        if proc.returncode:
            raise SystemExit(f"training job failed ({proc.returncode}):\n{err[-2000:]}")
    return [pd.read_csv(out / "train_log.tsv", sep="\t") for out in outs]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", default=str(REPO / "config.yaml"))
    ap.add_argument("--experiment", default="mad")
    ap.add_argument("--workdir", default=os.path.join(os.environ.get("TMPDIR", "/tmp"), "madflow_bench_train"))
    ap.add_argument("--steps", type=int, default=40, help="steps per job and repeat")
    ap.add_argument("--skip", type=int, default=5, help="first steps per job left out (warm-up)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--cores", type=int, default=os.cpu_count())
    args = ap.parse_args()

    cfg = yaml.safe_load(Path(args.config).read_text())
    tables = build_tables(Path(args.workdir), cfg["tiling"]["magnifications"], cfg["tiling"]["tile_px"],
                          cfg["tiling"]["min_tissue"])
    # every way to split the cores into equal jobs, each with the loader in a worker or not
    layouts = [(jobs, args.cores // jobs, workers) for jobs in range(1, args.cores + 1)
               if args.cores % jobs == 0 for workers in (1, 0)]
    print(f"# load average {' '.join(f'{x:.2f}' for x in os.getloadavg())}, cores {args.cores}, "
          f"experiment {args.experiment}, {args.steps} steps per job, median of {args.repeats}", flush=True)
    step_s = {layout: [] for layout in layouts}
    for repeat in range(args.repeats):
        for layout in layouts:
            jobs, threads, workers = layout
            with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
                logs = run_layout(Path(args.config), args.experiment, tables, jobs, threads, workers,
                                  args.steps, Path(tmp))
            # each job's median step time in this repeat, then the slowest job (the layout waits)
            step_s[layout].append(max(float(log["seconds"].iloc[args.skip:].median()) for log in logs))
        print(f"# repeat {repeat + 1}/{args.repeats} done", flush=True)
    base = None
    rows = []
    for (jobs, threads, workers), values in step_s.items():
        s = statistics.median(values)
        rate = jobs / s
        base = base or rate
        rows.append({"jobs x threads": f"{jobs} x {threads}", "loader": "worker" if workers else "in-process",
                     "s/step per job (median)": round(s, 4), "steps/s (machine)": round(rate, 3),
                     "vs first row": round(rate / base, 2)})
    print(pd.DataFrame(rows).to_string(index=False))


if __name__ == "__main__":
    main()
