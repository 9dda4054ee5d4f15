"""What one `evaluate` job costs at different thread counts, side by side.

Runs the evaluate rule's computation (madflow.metrics.evaluate on every embedded tile of one
experiment of a finished run, with the config's bootstrap and CV settings) in a fresh
process per measurement, thread counts interleaved, and prints per thread count the median
wall and CPU seconds (the child's user + system time) and whether the metrics equal those of
the first thread count.

    python bench/bench_evaluate.py [--results results] [--config config.yaml] [--experiment mad]
                                   [--threads 1 2] [--repeats 3]

``--config``: the run's config (its magnifications, purity, bootstrap and CV settings).

The probes, k-means and bootstraps work on matrices of a few thousand rows x 128: spinning
BLAS/OpenMP threads cost more than they give there. On a shared machine run it with
``nice -n 19``; the load average is printed first.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd
import yaml

REPO = Path(__file__).resolve().parents[1]


def child(results: Path, config: Path, experiment: str, threads: int, out: str) -> None:
    """One evaluation, as the evaluate rule runs it; metrics to ``out``."""
    sys.path.insert(0, str(REPO))
    from madflow.features import find_embedding_files, load_embeddings
    from madflow.manifest import read_checked_manifest
    from madflow.metrics import evaluate

    cfg = yaml.safe_load(config.read_text())
    manifest = read_checked_manifest(results / "manifest.tsv")
    tables = [str(results / "tiles" / f"{s}.parquet") for s in manifest["slide_id"]]
    tiles, X = load_embeddings(find_embedding_files([results / experiment / "seed0" / "embeddings"], tables), tables)
    tiles["split"] = tiles["slide_id"].map(manifest.set_index("slide_id")["split"])
    metrics, _ = evaluate(tiles, X, magnifications=cfg["tiling"]["magnifications"],
                          min_purity=cfg["tiling"]["min_purity"], n_bootstrap=cfg["evaluate"]["n_bootstrap"],
                          cv_folds=cfg["evaluate"]["cv_folds"], seed=cfg["seed"], threads=threads)
    metrics.to_csv(out, sep="\t", index=False)


def measure(results: Path, config: Path, experiment: str, threads: int, out: str) -> tuple[float, float]:
    """-> (wall s, CPU s) of one evaluation in a fresh interpreter with ``threads`` threads."""
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}  # as Snakemake sets it for a job
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    subprocess.run([sys.executable, __file__, "--child", out, "--results", str(results), "--config", str(config),
                    "--experiment", experiment, "--threads", str(threads)], check=True, env=env)
    wall = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return wall, (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--results", default="results", help="a finished run's results folder")
    ap.add_argument("--config", default=str(REPO / "config.yaml"), help="the run's config")
    ap.add_argument("--experiment", default="mad")
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    results, config = Path(args.results), Path(args.config)
    if args.child:
        child(results, config, args.experiment, args.threads[0], args.child)
        return 0
    embeddings = results / args.experiment / "seed0" / "embeddings"
    if not embeddings.is_dir():
        raise SystemExit(f"{embeddings} does not exist: run the workflow (snakemake --cores 2) first")
    print(f"# load average {' '.join(f'{x:.2f}' for x in os.getloadavg())}, cpus {os.cpu_count()}", file=sys.stderr)
    runs = {n: [] for n in args.threads}
    with tempfile.TemporaryDirectory() as tmp:
        outs = {n: os.path.join(tmp, f"metrics_{n}.tsv") for n in args.threads}
        for rep in range(args.repeats):
            for n in args.threads:
                runs[n].append(measure(results, config, args.experiment, n, outs[n]))
            print(f"# repeat {rep + 1}/{args.repeats} done", file=sys.stderr)
        reference = pd.read_csv(outs[args.threads[0]], sep="\t")
        same = {n: pd.read_csv(outs[n], sep="\t").equals(reference) for n in args.threads}
    first = statistics.median(w for w, _ in runs[args.threads[0]])
    table = pd.DataFrame([{
        "threads": n,
        "wall s (median)": statistics.median(w for w, _ in runs[n]),
        "CPU s (median)": statistics.median(c for _, c in runs[n]),
        "speed vs first": first / statistics.median(w for w, _ in runs[n]),
        "metrics equal first": same[n],
    } for n in args.threads])
    print(f"evaluate {args.experiment} of {results} ({args.repeats} repeats, interleaved)")
    print(table.to_string(index=False, float_format=lambda v: f"{v:.2f}"))
    print(json.dumps({"load_average": os.getloadavg()}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
