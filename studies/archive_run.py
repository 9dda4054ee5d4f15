"""Archive one seed of a workflow run in the repository, so that a study longer than one working
session survives it: `studies/runs/<study>/seed<s>/<experiment>/` gets the run's own tidy
`metrics.tsv` (copied as the workflow wrote it), `train_log.tsv` and `cross_scale_cue.tsv`, and
`seed<s>/run.json` records what produced them: the commit, the sha256 of the resolved
configuration (the part that changes results: `config_sha256`), the CPU model, this machine's
GEMM rate, and per experiment its steps, training wall time and `experiment_sha256` (the same
hash over the settings that experiment depends on: every section but `experiments`, plus its
own entry and its `init` chain's).

    python studies/archive_run.py RESULTS_DIR STUDY --seed S [--experiments base mad ...]

Run it on the machine that ran the workflow (the GEMM rate is measured here and now, median of
five 1024^3 fp32 products at the training's 2 threads). `studies/results_table.py
studies/runs/<study>` combines the archived seeds, and only seeds that ran each experiment under
one configuration.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import platform
import shutil
import statistics
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import pandas as pd

REPO = Path(__file__).resolve().parents[1]
RUN_FILES = ("metrics.tsv", "train_log.tsv", "cross_scale_cue.tsv")
# settings that say where and which runs happen, not what a run computes
NOT_RESULT_KEYS = ("resources", "default_experiments", "study")


def result_config(config: dict) -> dict:
    """The part of a resolved config that changes a run's numbers (training seeds excluded:
    they are the archive's own axis)."""
    kept = {k: v for k, v in config.items() if k not in NOT_RESULT_KEYS}
    kept["train"] = {k: v for k, v in (kept.get("train") or {}).items() if k != "seeds"}
    return kept


def experiment_config(config: dict, name: str) -> dict:
    """What one experiment's numbers depend on: the result config with `experiments` cut down to
    its own entry and those of the experiments it starts from (its `init` chain). Adding or
    editing another experiment in config.yaml leaves it unchanged."""
    kept = result_config(config)
    entries = kept.pop("experiments", None) or {}
    default_init = (kept.get("train") or {}).get("init")
    chain = {}
    while name in entries and name not in chain:
        chain[name] = entries[name]
        name = entries[name].get("init", default_init)
    kept["experiments"] = chain
    return kept


def _sha256(value) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True).encode()).hexdigest()


def config_sha256(config: dict) -> str:
    return _sha256(result_config(config))


def experiment_sha256(config: dict, name: str) -> str:
    return _sha256(experiment_config(config, name))


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def gemm_gflops(threads: int = 2, repeats: int = 5) -> float:
    import torch

    torch.set_num_threads(threads)
    a, b = torch.randn(1024, 1024), torch.randn(1024, 1024)
    a @ b
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(10):
            a @ b
        times.append((time.perf_counter() - t0) / 10)
    return 2 * 1024 ** 3 / statistics.median(times) / 1e9


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("results", help="the workflow's results folder")
    ap.add_argument("study", help="study name: studies/runs/<study>")
    ap.add_argument("--seed", type=int, required=True)
    ap.add_argument("--experiments", nargs="*", help="default: every experiment with this seed's metrics.tsv")
    ap.add_argument("--threads", type=int, default=2, help="threads of the GEMM measurement (the training's)")
    ap.add_argument("--gemm-gflops", type=float, default=None,
                    help="this machine's GEMM rate as measured quietly (bench/bench_train.py 'GEMM (peak)'); "
                         "default: measured now")
    args = ap.parse_args(argv)
    results = Path(args.results)
    names = args.experiments or sorted(p.parent.parent.name for p in results.glob(f"*/seed{args.seed}/metrics.tsv"))
    if not names:
        raise SystemExit(f"no {results}/*/seed{args.seed}/metrics.tsv: nothing to archive")
    dest = REPO / "studies" / "runs" / args.study / f"seed{args.seed}"
    configs, commits, experiments = {}, set(), {}
    for name in names:
        run = results / name / f"seed{args.seed}"
        if not (run / "metrics.tsv").is_file():
            raise SystemExit(f"{run}: no metrics.tsv (the experiment has not finished)")
        provenance_file = results / name / "provenance.json"
        if not provenance_file.is_file():  # per-seed targets do not ask for it; `exp_<name>` and `study` do
            raise SystemExit(f"{provenance_file}: missing; write it first with `snakemake {provenance_file}`")
        provenance = json.loads(provenance_file.read_text())
        configs[name] = config_sha256(provenance["config"])
        experiment_hash = experiment_sha256(provenance["config"], name)
        commits.add((provenance["git_commit"], bool(provenance["git_dirty"])))
        (dest / name).mkdir(parents=True, exist_ok=True)
        for f in RUN_FILES:
            if (run / f).is_file():
                shutil.copyfile(run / f, dest / name / f)
        entry = {"config_sha256": configs[name], "experiment_sha256": experiment_hash}
        log = run / "train_log.tsv"
        if log.is_file():
            steps = pd.read_csv(log, sep="\t")
            entry.update(steps=int(len(steps)), step_seconds=round(float(steps["seconds"].sum()), 1)
                         if "seconds" in steps and len(steps) else 0.0)
        bench = results / "benchmarks" / "pretrain" / f"{name}_seed{args.seed}.tsv"
        if bench.is_file():
            entry["pretrain_wall_s"] = round(float(pd.read_csv(bench, sep="\t").iloc[-1]["s"]), 1)
        experiments[name] = entry
    run_json = {
        "study": args.study,
        "seed": args.seed,
        # one whole configuration, or null where this seed's experiments ran under several (an
        # experiment added to config.yaml between them): results_table.py compares seeds per
        # experiment, by experiment_sha256
        "config_sha256": configs[names[0]] if len(set(configs.values())) == 1 else None,
        "commit": sorted(c for c, _ in commits),
        "dirty": any(d for _, d in commits),
        "cpu": cpu_model(),
        "gemm_gflops_fp32": round(args.gemm_gflops or gemm_gflops(args.threads), 1),
        "gemm_source": "given (--gemm-gflops)" if args.gemm_gflops else "measured at archiving",
        "gemm_threads": args.threads,
        "experiments": experiments,
        "archived": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    (dest / "run.json").write_text(json.dumps(run_json, indent=1) + "\n")
    print(f"archived {len(names)} experiment(s) of seed {args.seed} in {dest.relative_to(REPO)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
