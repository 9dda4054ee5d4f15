"""Training data-loader throughput versus training consumption, side by side.

Builds a small synthetic demo (4 slides of 4096 px; reused from --workdir when already
there), tiles it with the config's magnifications / tile size / min_tissue, and measures
in one process, with repeats interleaved so that background load hits every row alike:

  loader (augmented)   MADBatchDataset.batch_for_step with the training Augmenter
  loader (no augment)  the same rows with Augmenter(enabled=False) (read + normalise only)
  augment only         the Augmenter alone on an already read batch
  train step           the objective's step as training runs it (madflow.train.steps: student
                       fwd+bwd+clip+AdamW, teacher fwd, EMA update) on one augmented batch
  train step (compile)  the same step with `train.compile: true` (torch.compile, inductor, of
                       student and teacher); its one-off compilation time is printed below
  train step (bf16)     the same step with `train.precision: bf16` (bf16 autocast on this device)
  train step (compile + bf16)  both
  embed forward        the backbone's forward alone on the same images (what embedding does)
  GEMM (peak)          a 1024^3 fp32 matrix product: what this CPU's cores can do
  GEMM (model shape)   the qkv product of the student forward at the step's shape
                       ([images x tokens, dim] @ [dim, 3 dim]): what matrices this small can do

The train step's FLOPs are counted once (torch.utils.flop_counter, forward + backward of
every matrix product) and set against both GEMM rates: how close the step is to what the
CPU can do, and so how many steps per minute any demo can buy on this machine.

Images per step = teacher + student views (B + B*V). The loader rows run with 1 torch
thread, as in a DataLoader worker (torch sets 1 thread there); the train row uses this
process's thread count (--threads). Supply = loader img/s x max(num_workers, 1); the
issue asks for supply >= 2 x what training consumes. Every number is a median over
--repeats of the per-repeat rate (wall clock).

    python bench/bench_train.py [--config config.yaml] [--repeats 5] [--steps 2]
                                [--model-kwargs '{"patch_size": 16}'] [--workdir DIR]

On a shared machine run it with ``nice -n 19``; the load average is printed first.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from madflow.data import Augmenter, MADBatchDataset, TileIndex, load_tables  # noqa: E402
from madflow.manifest import check_manifest  # noqa: E402
from madflow.synth import make_demo  # noqa: E402
from madflow.tiling import tile_slide  # noqa: E402
from madflow.config import resolve_train_config  # noqa: E402
from madflow.model import backbone_dim  # noqa: E402
from madflow.train.loop import augmenter  # noqa: E402
from madflow.train.steps import OBJECTIVES  # noqa: E402


def build_tables(workdir: Path, mags, tile_px: int, min_tissue: float) -> list[str]:
    """Demo slides + per-slide tile tables (train split only); cached in workdir."""
    tag = f"T{tile_px}_m{'-'.join(f'{m:g}' for m in mags)}_t{min_tissue:g}"
    tdir = workdir / f"tiles_{tag}"
    done = tdir / "DONE"
    if done.exists():
        return done.read_text().split()
    slides = workdir / "slides"
    man = slides / "manifest.tsv"
    if not man.exists():
        t0 = time.perf_counter()
        make_demo(slides, n_slides=4, size=4096, seed=0, n_test=1, workers=1)
        print(f"# demo slides written in {time.perf_counter() - t0:.1f} s", file=sys.stderr)
    checked, _ = check_manifest(man, list(mags), tile_px, "error", 0.3, 0)
    tdir.mkdir(parents=True, exist_ok=True)
    out = []
    for _, row in checked.iterrows():
        if str(row.get("split", "train")) != "train":
            continue
        grid = tile_slide(row.to_dict(), list(mags), tile_px, min_tissue)[0]
        p = tdir / f"{row['slide_id']}.parquet"
        grid.to_parquet(p)
        out.append(str(p))
    done.write_text("\n".join(out) + "\n")
    return out


TRAIN_ROWS = ("train step", "train step (compile)", "train step (bf16)", "train step (compile + bf16)")
PIPELINE_ROWS = ("loader (augmented)", "loader (no augment)", "augment only", *TRAIN_ROWS, "embed forward")


class Threads:
    """Temporarily set torch's intra-op thread count."""

    def __init__(self, n: int):
        self.n = int(n)

    def __enter__(self):
        self.old = torch.get_num_threads()
        torch.set_num_threads(self.n)

    def __exit__(self, *exc):
        torch.set_num_threads(self.old)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", default=str(REPO / "config.yaml"))
    ap.add_argument("--experiment", default="mad", help="experiment of the config (its overrides apply)")
    ap.add_argument("--workdir", default=os.path.join(os.environ.get("TMPDIR", "/tmp"), "madflow_bench_train"))
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--steps", type=int, default=2, help="steps timed per repeat and row")
    ap.add_argument("--threads", type=int, default=torch.get_num_threads(),
                    help="torch threads of the training step (default: this process's)")
    ap.add_argument("--model-kwargs", default=None,
                    help="JSON merged into model.kwargs, e.g. '{\"patch_size\": 16}'")
    ap.add_argument("--json", default=None, help="also write the table as JSON here")
    args = ap.parse_args(argv)

    with open(args.config) as f:
        cfg = yaml.safe_load(f)
    exp = (cfg.get("experiments") or {}).get(args.experiment) or {}
    mode, tcfg, mcfg = resolve_train_config(cfg, exp)
    if args.model_kwargs:
        mcfg["kwargs"] = {**(mcfg.get("kwargs") or {}), **json.loads(args.model_kwargs)}
    tl = cfg.get("tiling") or {}
    mags = [float(m) for m in tl.get("magnifications", [2.5, 10, 40])]
    T = int(tl.get("tile_px", 224))
    min_tissue = float(tl.get("min_tissue", 0.5))
    B, n_local = int(tcfg["batch_parents"]), int(tcfg["n_local"])
    nw = int(tcfg.get("num_workers") or 0)
    torch.set_num_threads(args.threads)
    print(f"# load average {' '.join(f'{x:.2f}' for x in os.getloadavg())}, cpus {os.cpu_count()}, "
          f"torch {torch.__version__}, train threads {args.threads}", file=sys.stderr)

    # ---- data -------------------------------------------------------------------------
    tables = build_tables(Path(args.workdir), mags, T, min_tissue)
    index = TileIndex(load_tables(tables))
    aug = augmenter(tcfg)
    big = 10 ** 6
    kw = dict(index=index, mode=mode.name, pairs=tcfg["pairs"], n_parents=B, n_local=n_local, seed=0,
              total_steps=big, parent_view=bool(tcfg["parent_view"]))
    ds_aug = MADBatchDataset(**kw, augmenter=aug)
    ds_raw = MADBatchDataset(**kw, augmenter=Augmenter(enabled=False))
    probe = ds_raw.batch_for_step(0)
    V = int(probe["student"].shape[1])
    n_img = B + B * V

    # ---- model: the objective's own step, as training runs it ------------------------------
    def make_objective(**settings):
        torch.manual_seed(0)
        built = OBJECTIVES[mode.objective]({**tcfg, **settings}, mcfg, index, T, big, torch.device("cpu"))
        built.train_mode()
        return built

    objective = make_objective(compile="false", precision="fp32")
    batch = ds_aug.batch_for_step(0)

    def train_step(step: int) -> float:
        return objective.step(batch, step)["loss"]

    variants = {"train step (compile)": dict(compile="true", precision="fp32"),
                "train step (bf16)": dict(compile="false", precision="bf16"),
                "train step (compile + bf16)": dict(compile="true", precision="bf16")}
    variant_steps, compile_seconds = {}, {}
    for name, settings in variants.items():
        built = make_objective(**settings)
        t0 = time.perf_counter()
        built.step(batch, 0)  # compiles (where asked), warms up
        compile_seconds[name] = time.perf_counter() - t0
        variant_steps[name] = (lambda b: lambda s: b.step(batch, s)["loss"])(built)

    images = torch.cat([batch["teacher"].reshape(-1, 3, T, T), batch["student"].reshape(-1, 3, T, T)])
    backbone = objective.model.teacher.backbone

    @torch.inference_mode()
    def embed_forward(step: int) -> None:
        """What the embed step does per image: the backbone's forward alone, no gradients."""
        backbone(images)

    raw_t, raw_s = ds_raw.raw_views(ds_raw.rows_for_step(0))
    raw_all = torch.cat([raw_t, raw_s.reshape(-1, 3, T, T)])
    load_threads = 1 if nw > 0 else args.threads

    # matrix-product references at the train step's threads
    big_a, big_b = torch.randn(1024, 1024), torch.randn(1024, 1024)
    dim = backbone_dim(backbone)
    tokens = int(backbone.patch_embed.num_patches) + int(getattr(backbone, "num_prefix_tokens", 1))
    shape_a, shape_b = torch.randn(int(probe["student"].shape[0]) * V * tokens, dim), torch.randn(dim, 3 * dim)
    gemm_flop = {"GEMM (peak)": 2 * 1024 ** 3, "GEMM (model shape)": 2 * shape_a.shape[0] * dim * 3 * dim}

    rows = {
        "GEMM (peak)": dict(threads=args.threads, fn=lambda s: big_a @ big_b),
        "GEMM (model shape)": dict(threads=args.threads, fn=lambda s: shape_a @ shape_b),
        "loader (augmented)": dict(threads=load_threads, fn=lambda s: ds_aug.batch_for_step(s)),
        "loader (no augment)": dict(threads=load_threads, fn=lambda s: ds_raw.batch_for_step(s)),
        "augment only": dict(threads=load_threads,
                             fn=lambda s: aug(raw_all, np.random.default_rng([0, s, 0, 1]))),
        "train step": dict(threads=args.threads, fn=train_step),
        **{name: dict(threads=args.threads, fn=fn) for name, fn in variant_steps.items()},
        "embed forward": dict(threads=args.threads, fn=embed_forward),
    }
    # warm-up (readers opened, allocator, first-call overheads)
    for r in rows.values():
        with Threads(r["threads"]):
            r["fn"](1)
    times = {k: [] for k in rows}
    step = 100
    for rep in range(args.repeats):
        for name, r in rows.items():
            with Threads(r["threads"]):
                t0 = time.perf_counter()
                for s in range(step, step + args.steps):
                    r["fn"](s)
                times[name].append((time.perf_counter() - t0) / args.steps)
        step += args.steps  # fresh rows every repeat (no reader-cache replay)
        print(f"# repeat {rep + 1}/{args.repeats} done", file=sys.stderr)

    from torch.utils.flop_counter import FlopCounterMode

    with Threads(args.threads), FlopCounterMode(display=False) as counter:
        train_step(step)
    step_flop = counter.get_total_flops()

    kwargs = mcfg.get("kwargs") or {}
    tab = pd.DataFrame([{
        "measurement": name,
        "threads": r["threads"],
        "images/step": n_img,
        "s/step (median)": statistics.median(times[name]),
        "s/step (min)": min(times[name]),
        "images/s": n_img / statistics.median(times[name]) if name in PIPELINE_ROWS else float("nan"),
        "GFLOP/s": gemm_flop.get(name, step_flop if name in TRAIN_ROWS else float("nan"))
        / statistics.median(times[name]) / 1e9,
    } for name, r in rows.items()])
    train_rate = float(tab.loc[tab.measurement == "train step", "images/s"].iloc[0])
    load_rate = float(tab.loc[tab.measurement == "loader (augmented)", "images/s"].iloc[0])
    supply = load_rate * max(nw, 1)
    ratio = supply / train_rate
    print(f"model {mcfg['arch']} {json.dumps(kwargs)} @ {T}px, head {mcfg.get('head')}; "
          f"batch {B} parents x {V} student views + teacher = {n_img} images/step; mode {mode.name}")
    print(pd.DataFrame(tab).to_string(index=False, float_format=lambda v: f"{v:.4g}"))
    print(f"num_workers = {nw}: loader supply {supply:.1f} images/s "
          f"({load_rate:.1f} x {max(nw, 1)} process(es)); training consumes {train_rate:.1f} images/s")
    print(f"ratio loader/training = {ratio:.2f}  (required >= 2: {'PASS' if ratio >= 2 else 'FAIL'})")
    embed_rate = float(tab.loc[tab.measurement == "embed forward", "images/s"].iloc[0])
    print(f"embedding forward / training images/s at {args.threads} thread(s) = {embed_rate / train_rate:.2f} "
          f"(goal >= 3)")
    step_rate = float(tab.loc[tab.measurement == "train step", "GFLOP/s"].iloc[0])
    for name in gemm_flop:
        rate = float(tab.loc[tab.measurement == name, "GFLOP/s"].iloc[0])
        print(f"train step {step_flop / 1e9:.1f} GFLOP at {step_rate:.1f} GFLOP/s = {step_rate / rate:.2f} of {name} "
              f"({rate:.1f} GFLOP/s)")
    fp32_step = float(tab.loc[tab.measurement == "train step", "s/step (median)"].iloc[0])
    for name, seconds in compile_seconds.items():
        step_s = float(tab.loc[tab.measurement == name, "s/step (median)"].iloc[0])
        gain = fp32_step - step_s
        pays = f"pays off after {(seconds - step_s) / gain:.0f} steps" if gain > 0 else "never pays off (not faster)"
        print(f"{name}: {fp32_step / step_s:.2f}x the fp32 step; first step {seconds:.1f} s "
              f"(compilation and warm-up); {pays}")
    if nw == 0:
        print("note: num_workers = 0 loads in the training process, serially with the step; "
              "the ratio is then only indicative")
    if args.json:
        Path(args.json).write_text(json.dumps({"table": tab.to_dict("records"), "num_workers": nw,
                                               "ratio": ratio, "model_kwargs": kwargs}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
