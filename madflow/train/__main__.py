"""Train one experiment of a config, as the workflow's pretrain rule does::

    python -m madflow.train --config resolved.json --experiment mad \
        --tables results/tiles/a.parquet results/tiles/b.parquet --out results/mad/seed0 --seed 0

Under ``torchrun`` (``--nproc_per_node=N``, on one node or several) it trains with DDP over
every process of the job.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys

from madflow.runlog import log_startup
from madflow.train.loop import log, train


def load_config(path: str) -> dict:
    """A config as YAML or JSON; the workflow's per-experiment provenance record
    ``{"config": {...}, ...}`` is unwrapped."""
    with open(path) as f:
        text = f.read()
    if path.endswith((".yaml", ".yml")):
        import yaml

        cfg = yaml.safe_load(text)
    else:
        cfg = json.loads(text)
    if isinstance(cfg, dict) and "train" not in cfg and isinstance(cfg.get("config"), dict):
        cfg = cfg["config"]
    return cfg


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m madflow.train", description=__doc__.split("::")[0].strip())
    parser.add_argument("--config", required=True, help="resolved config (JSON or YAML)")
    parser.add_argument("--experiment", required=True, help="name under config 'experiments'")
    parser.add_argument("--tables", nargs="+", required=True, help="tile tables (parquet) of the train slides")
    parser.add_argument("--out", required=True, help="output directory")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda")
    parser.add_argument("--init", default=None, help="encoder file to start from (the experiment's init)")
    parser.add_argument("--stop-after", type=int, default=None, help="stop after this many steps (testing)")
    parser.add_argument("--log-level", default="INFO")
    args = parser.parse_args(argv)
    logging.basicConfig(level=getattr(logging, args.log_level.upper(), logging.INFO), stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    log_startup(log)
    cfg = load_config(args.config)
    experiments = cfg.get("experiments") or {}
    if args.experiment not in experiments:
        parser.error(f"experiment {args.experiment!r} not in config (have {sorted(experiments)})")
    summary = train(cfg, experiments[args.experiment] or {}, args.tables, args.out, args.seed, device=args.device,
                    experiment_name=args.experiment, stop_after=args.stop_after, init_path=args.init)
    if int(os.environ.get("RANK", "0")) == 0:
        log.info("done: %s", {k: v for k, v in summary.items() if k not in ("last", "model")})
    return 0


if __name__ == "__main__":
    sys.exit(main())
