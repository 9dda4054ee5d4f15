"""Where a finished workflow run spent its time: CPU seconds per stage, the share spent in
training steps, and the per-job overhead (interpreter start and imports).

    python bench/profile_demo.py [RESULTS_DIR]        # default: results

Reads what the run left behind: Snakemake's ``benchmark:`` file of every job
(``results/benchmarks/<rule>/*.tsv``: wall and CPU seconds), the training logs
(``results/<experiment>/seed<s>/train_log.tsv``: seconds per step), the ``startup`` line each
job logs (``results/logs/``) and Snakemake's own logs of the run (``.snakemake/log/``, for
the wall time from first to last job of each invocation, summed). CPU time in training steps
= each pretrain job's CPU time x (its step seconds / its wall seconds).
"""

from __future__ import annotations

import re
import sys
from datetime import datetime
from pathlib import Path

import pandas as pd

STAGES = {"demo_slides": "demo slides", "manifest": "tiling", "tile": "tiling", "pretrain": "training",
          "embed": "embedding", "evaluate": "evaluation", "experiment_metrics": "evaluation",
          "summary": "evaluation", "figures": "figures", "experiment_config": "other"}
STARTUP = re.compile(r"startup ([0-9.]+) CPU s")
STAMP = re.compile(r"^\[(\w{3} \w{3} +\d+ \d\d:\d\d:\d\d \d{4})\]")


def job_benchmarks(results: Path) -> pd.DataFrame:
    rows = []
    for path in sorted((results / "benchmarks").glob("*/*.tsv")):
        bench = pd.read_csv(path, sep="\t").iloc[-1]  # the last attempt of the job
        rows.append({"rule": path.parent.name, "job": path.stem, "wall_s": float(bench["s"]),
                     "cpu_s": float(bench["cpu_time"])})
    if not rows:
        raise SystemExit(f"no benchmark files under {results / 'benchmarks'}: run the workflow first")
    return pd.DataFrame(rows)


def training_step_seconds(results: Path, job: str) -> float:
    experiment, seed = job.rsplit("_seed", 1)
    log = results / experiment / f"seed{seed}" / "train_log.tsv"
    if not log.is_file():
        return 0.0
    return float(pd.read_csv(log, sep="\t")["seconds"].sum())


def startup_seconds(results: Path) -> tuple[float, int]:
    total, n = 0.0, 0
    for path in (results / "logs").rglob("*.log"):
        for match in STARTUP.finditer(path.read_text(errors="replace")):
            total += float(match.group(1))
            n += 1
    return total, n


def run_wall_seconds(workdir: Path) -> tuple[float | None, int]:
    """-> (wall seconds, invocations): first to last timestamp of each of Snakemake's logs of
    runs in ``workdir``, summed (a run resumed over several invocations counts each one's
    span, not the pauses between them)."""
    total, n = 0.0, 0
    for path in sorted((workdir / ".snakemake" / "log").glob("*.snakemake.log")):
        stamps = [datetime.strptime(m.group(1), "%a %b %d %H:%M:%S %Y")
                  for line in path.read_text(errors="replace").splitlines() if (m := STAMP.match(line))]
        if len(stamps) > 1:
            total += (stamps[-1] - stamps[0]).total_seconds()
            n += 1
    return (total if n else None), n


def profile(results: Path) -> tuple[pd.DataFrame, dict]:
    jobs = job_benchmarks(results)
    jobs["stage"] = jobs["rule"].map(STAGES).fillna("other")
    train = jobs["rule"] == "pretrain"
    step_s = pd.Series([training_step_seconds(results, j) for j in jobs.loc[train, "job"]],
                       index=jobs.index[train], dtype=float)
    jobs["train_step_cpu_s"] = 0.0
    jobs.loc[train, "train_step_cpu_s"] = jobs.loc[train, "cpu_s"] * (step_s / jobs.loc[train, "wall_s"]).clip(upper=1)
    table = jobs.groupby("stage").agg(jobs=("job", "count"), wall_s=("wall_s", "sum"), cpu_s=("cpu_s", "sum"))
    total_cpu = float(table["cpu_s"].sum())
    table["cpu_share"] = table["cpu_s"] / total_cpu
    startup, n_startup = startup_seconds(results)
    summary = {"jobs": len(jobs), "cpu_s": total_cpu,
               "train_step_cpu_share": float(jobs["train_step_cpu_s"].sum()) / total_cpu,
               "startup_cpu_s": startup, "startup_jobs": n_startup, "startup_cpu_share": startup / total_cpu,
               **dict(zip(("run_wall_s", "run_invocations"), run_wall_seconds(results.parent)))}
    return table.sort_values("cpu_s", ascending=False).reset_index(), summary


def main(argv: list[str]) -> int:
    results = Path(argv[0] if argv else "results")
    table, s = profile(results)
    print(table.to_string(index=False, float_format=lambda v: f"{v:.3f}" if v < 1 else f"{v:.1f}"))
    print(f"\n{s['jobs']} jobs, {s['cpu_s']:.0f} CPU s in all")
    print(f"training steps: {100 * s['train_step_cpu_share']:.1f}% of the CPU time")
    print(f"per-job overhead (interpreter start and imports, {s['startup_jobs']} jobs): "
          f"{s['startup_cpu_s']:.0f} s, {100 * s['startup_cpu_share']:.1f}% of the CPU time")
    if s["run_wall_s"] is not None:
        print(f"run wall time (Snakemake's logs, first to last job of each of {s['run_invocations']} "
              f"invocation(s), summed): {s['run_wall_s'] / 60:.1f} min")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
