"""Recipe trials behind docs/results.md: train one variant on the demo's train slides with the
workflow's own training (madflow.train) and evaluate it on a subsample (every 2.5x/10x tissue
tile, a random 25% of the 40x ones), faster than a whole workflow run.

    snakemake --cores 2 tiles        # the demo's tile tables and manifest in results/
    python studies/recipe_trials.py NAME ['{"mode": "same_mag"}'] [train.k=v] [kw.k=v] [head.k=v]

The JSON argument is the experiment entry (mode and overrides, as in config.yaml); kw.* are
timm model kwargs, head.* DINO-head settings, train.* training settings. An entry with
`init: <experiment>` starts from results/<experiment>/seed0/encoder.pt (a finished workflow
run's stage 1); one with `encoder: <path>` trains nothing and evaluates that encoder; one with
`curve: [k1, k2, ...]` also evaluates the teacher after k1, k2, ... steps of the same run (the
schedules of the full run; training resumes bitwise from the checkpoint between points). One
JSON line per evaluation is appended to studies/recipe_trials.jsonl.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import yaml

from madflow.config import resolve_train_config
from madflow.embed import backbone_encoder, build_encoder, l2_normalise
from madflow.manifest import read_checked_manifest
from madflow.metrics import evaluate
from madflow.modes import get_mode
from madflow.slides import SlideReader
from madflow.train import train

REPO = Path(__file__).resolve().parents[1]
RESULTS = Path("results")
HEADLINE = {"BA10_10": ("probe_ba", "10->10"), "BA10_40": ("probe_ba", "10->40"),
            "BA40_40": ("probe_ba", "40->40"),
            "BA10_40c": ("probe_ba_magcentred", "10->40"), "BA25_25": ("probe_ba", "2.5->2.5"),
            "BA25_10": ("probe_ba", "2.5->10"), "BA40_10": ("probe_ba", "40->10"),
            "Rcc10_40": ("retention_cc", "10->40"), "AMI": ("ami", "global"),
            "leak": ("mag_leakage", "global"), "dh10_40": ("delta_hier", "10->40"),
            "dh25_10": ("delta_hier", "2.5->10"), "off10_40": ("mag_offset", "10->40"),
            "offs10_40": ("mag_offset_spread", "10->40")}


def parse_args(argv: list[str]) -> tuple[str, dict, dict]:
    """-> (trial name, experiment entry, config with the key=value overrides applied)."""
    name, rest = argv[0], argv[1:]
    experiment = json.loads(rest[0]) if rest and rest[0].startswith("{") else {}
    cfg = yaml.safe_load((REPO / "config.yaml").read_text())
    sections = {"kw": cfg["model"]["kwargs"], "head": cfg["model"]["head"]}
    for item in rest:
        if item.startswith("{"):
            continue
        dotted, value = item.split("=", 1)
        section, key = dotted.split(".", 1)
        sections.get(section, cfg.setdefault(section, {}))[key] = yaml.safe_load(value)
    return name, experiment, cfg


def embed_subsample(encode, manifest: pd.DataFrame, rng: np.random.Generator) -> tuple[pd.DataFrame, np.ndarray]:
    frames, features = [], []
    for slide_id, split in zip(manifest["slide_id"], manifest["split"]):
        tiles = pd.read_parquet(RESULTS / "tiles" / f"{slide_id}.parquet")
        tiles = tiles[tiles["tissue"]]
        tiles = tiles[(tiles["mag"] < 40) | (rng.random(len(tiles)) < 0.25)].reset_index(drop=True)
        reader = SlideReader(tiles["path"].iloc[0])
        x = np.concatenate([encode(reader.read_tiles(tiles.iloc[i:i + 512])) for i in range(0, len(tiles), 512)])
        frames.append(tiles.assign(split=split))
        features.append(l2_normalise(x))
    return pd.concat(frames, ignore_index=True), np.concatenate(features)


def main(argv: list[str]) -> int:
    logging.basicConfig(level=logging.WARNING)
    name, experiment, cfg = parse_args(argv)
    manifest = read_checked_manifest(RESULTS / "manifest.tsv")
    tables = [str(RESULTS / "tiles" / f"{s}.parquet") for s in manifest.loc[manifest["split"] == "train", "slide_id"]]
    out = RESULTS / "studies" / name
    t0 = time.time()
    mode = get_mode(experiment.get("mode"))
    curve = [int(k) for k in experiment.pop("curve", [])]
    encoder = experiment.get("encoder") or str(out / "encoder.pt")
    init = experiment.get("init")
    init_path = str(RESULTS / init / "seed0" / "encoder.pt") if init else None
    trains = mode.pretrain_job and not experiment.get("encoder")
    tile_px = int(cfg["tiling"]["tile_px"])
    for stop in curve + [None]:
        if trains:
            summary = train(cfg, experiment, tables, str(out), 0, device="cpu", experiment_name=name,
                            init_path=init_path, stop_after=stop)
        seconds = time.time() - t0
        if stop is None:
            encode, _ = build_encoder(experiment, encoder, tile_px)
            record(name, seconds, encode, manifest, Path(encoder).parent / "train_log.tsv", mode)
        else:
            tile_norm = bool(resolve_train_config(cfg, experiment)[1]["tile_norm"])
            encode = backbone_encoder(summary["model"].teacher.backbone, tile_norm)
            record(f"{name}@{stop}", seconds, encode, manifest, out / "train_log.tsv", mode)
    return 0


def record(name: str, seconds: float, encode, manifest: pd.DataFrame, train_log: Path, mode) -> None:
    """Evaluate an encoder on the subsample; print and append its JSON line."""
    tiles, features = embed_subsample(encode, manifest, np.random.default_rng(0))
    metrics, _ = evaluate(tiles, features, magnifications=[2.5, 10, 40], n_bootstrap=50, cv_folds=3)
    result = {"name": name, "ttrain": round(seconds)}
    for column, (metric, scope) in HEADLINE.items():
        result[column] = float(metrics.loc[(metrics.metric == metric) & (metrics.scope == scope), "value"].iloc[0])
    if mode.objective == "dino" and train_log.is_file():
        last = pd.read_csv(train_log, sep="\t").tail(10)
        result["ent"] = round(float(last["teacher_entropy"].mean()), 2)
        result["protos"] = float(last["prototypes_used"].mean())
        if "mag_offset" in last:  # the training batches' offset (train_log.tsv), last 10 steps
            result["batch_offset"] = round(float(last["mag_offset"].mean()), 3)
    print(json.dumps({k: round(v, 3) if isinstance(v, float) else v for k, v in result.items()}), flush=True)
    with open(REPO / "studies" / "recipe_trials.jsonl", "a") as f:
        f.write(json.dumps(result) + "\n")


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
