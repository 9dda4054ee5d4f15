"""GPU check of the MAD training step at paper scale (one command, a few minutes).

Builds a MADModel (timm backbone, pretrained=False, + DINO head; default ViT-L/14 reg4
DINOv2 at 224 px), then runs --steps training steps of madflow.train's step on random
input: teacher forward (no grad) on the parents, student forward+backward on
parents x views, DINOLoss, gradient clipping, AdamW, EMA teacher update, under bf16
autocast on CUDA. Reports the median step time, images/s (teacher + student images),
model FLOP utilisation and peak memory, and fails (exit 1) if a loss is not finite.

FLOPs per image are counted with torch.utils.flop_counter.FlopCounterMode on one
forward of the student (backbone + head); a step costs 3 x that per student image
(forward + backward) + 1 x per teacher image. MFU = achieved FLOP/s / peak bf16 dense
FLOP/s of the device (table below, or --peak-tflops).

    python bench/gpu_check.py                      # CUDA; "no CUDA device: skipped" without
    python bench/gpu_check.py --device cpu --arch vit_tiny_patch16_224 --steps 2   # smoke
"""
from __future__ import annotations

import argparse
import json
import math
import os
import resource
import statistics
import sys
import time
from contextlib import nullcontext
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import torch  # noqa: E402

# dense bf16 tensor-core peak, TFLOP/s; first matching substring of the device name wins
PEAK_BF16_TFLOPS = [
    ("H200", 989.0),
    ("H100 PCIe", 756.0),
    ("H100", 989.0),
    ("A100", 312.0),
    ("L40S", 362.0),
]


def peak_tflops(name: str) -> float | None:
    for key, v in PEAK_BF16_TFLOPS:
        if key.lower() in name.lower():
            return v
    return None


def _count_cpu_attention() -> None:
    """FlopCounterMode knows the CUDA attention kernels but not the CPU flash kernel; give
    it the same formula so that --device cpu counts the attention matmuls too."""
    from torch.utils import flop_counter as fcm

    op = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
    base = fcm.flop_registry.get(torch.ops.aten._scaled_dot_product_flash_attention)
    if op is not None and base is not None and op not in fcm.flop_registry:
        fcm.register_flop_formula(op, get_raw=True)(base)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cuda", help="cuda (default), cuda:N or cpu")
    ap.add_argument("--arch", default="vit_large_patch14_reg4_dinov2", help="timm ViT name")
    ap.add_argument("--img-size", type=int, default=224)
    ap.add_argument("--parents", type=int, default=32, help="teacher images per step")
    ap.add_argument("--views", type=int, default=5, help="student views per parent")
    ap.add_argument("--steps", type=int, default=30, help="timed steps")
    ap.add_argument("--warmup", type=int, default=None, help="untimed first steps (default 3 on CUDA, 1 on CPU)")
    ap.add_argument("--hidden-dim", type=int, default=2048)
    ap.add_argument("--bottleneck-dim", type=int, default=256)
    ap.add_argument("--n-prototypes", type=int, default=65536)
    ap.add_argument("--no-autocast", action="store_true", help="fp32 (default: bf16 autocast on CUDA)")
    ap.add_argument("--peak-tflops", type=float, default=None,
                    help="peak dense bf16 TFLOP/s of the device (default: from the built-in table)")
    ap.add_argument("--time-limit", type=float, default=420.0,
                    help="stop timing further steps after this many seconds in all")
    ap.add_argument("--json", default=None, help="also write the report as JSON here")
    args = ap.parse_args(argv)
    t_start = time.perf_counter()

    dev = torch.device(args.device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        print("no CUDA device: skipped")
        return 0
    if dev.type == "cuda":
        torch.cuda.set_device(dev.index or 0)
        dev = torch.device("cuda", dev.index or 0)
        dev_name = torch.cuda.get_device_name(dev)
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    else:
        dev_name = f"cpu ({os.cpu_count()} cores, {torch.get_num_threads()} torch threads)"
    use_bf16 = dev.type == "cuda" and not args.no_autocast
    autocast = torch.autocast(device_type="cuda", dtype=torch.bfloat16) if use_bf16 else nullcontext()
    warmup = args.warmup if args.warmup is not None else (3 if dev.type == "cuda" else 1)

    from madflow.config import TRAIN_DEFAULTS
    from madflow.train.steps import DINOObjective

    mcfg = {"arch": args.arch, "kwargs": {}, "checkpoint": None,
            "head": {"hidden_dim": args.hidden_dim, "bottleneck_dim": args.bottleneck_dim,
                     "n_prototypes": args.n_prototypes}}
    train_cfg = {**TRAIN_DEFAULTS, "batch_parents": args.parents, "lr": 1e-4, "freeze_last_layer_steps": 0}
    t0 = time.perf_counter()
    objective = DINOObjective(train_cfg, mcfg, None, args.img_size, 10 ** 6, dev)
    t_build = time.perf_counter() - t0
    model = objective.model
    if not use_bf16:  # the objective autocasts on CUDA; --no-autocast measures fp32
        objective.autocast = nullcontext()
    n_bb = sum(p.numel() for p in model.student.backbone.parameters())
    n_head = sum(p.numel() for p in model.student.head.parameters())
    objective.train_mode()

    B, V, S = args.parents, args.views, args.img_size
    g = torch.Generator(device="cpu").manual_seed(0)
    tin = torch.randn(B, 3, S, S, generator=g).to(dev)
    sin = torch.randn(B * V, 3, S, S, generator=g).to(dev)
    n_img = B + B * V

    # ---- FLOPs of one forward per image (backbone + head) ----------------------------
    from torch.utils.flop_counter import FlopCounterMode

    _count_cpu_attention()
    n_probe = 2
    with torch.no_grad(), autocast:
        fc = FlopCounterMode(display=False)
        with fc:
            model.student(sin[:n_probe])
    flops_img = fc.get_total_flops() / n_probe
    flops_step = 3.0 * flops_img * B * V + 1.0 * flops_img * B

    batch = {"teacher": tin, "student": sin.view(B, V, 3, S, S)}

    def step(i: int) -> float:
        """madflow.train.steps.DINOObjective.step, the step training runs."""
        return objective.step(batch, i)["loss"]  # .item() inside syncs the device

    def sync():
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)

    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    losses, times = [], []
    bad = None
    for i in range(warmup + args.steps):
        sync()
        t0 = time.perf_counter()
        lv = step(i)
        sync()
        dt = time.perf_counter() - t0
        losses.append(lv)
        if not math.isfinite(lv):
            bad = (i, lv)
            break
        if i >= warmup:
            times.append(dt)
        print(f"step {i:3d}{' (warm-up)' if i < warmup else ''}: loss {lv:.4f}  {dt:.3f} s", flush=True)
        if i >= warmup and time.perf_counter() - t_start > args.time_limit:
            print(f"time limit {args.time_limit:.0f} s reached after {len(times)} timed steps", flush=True)
            break

    if dev.type == "cuda":
        mem = {"peak_allocated_GiB": torch.cuda.max_memory_allocated(dev) / 2 ** 30,
               "peak_reserved_GiB": torch.cuda.max_memory_reserved(dev) / 2 ** 30}
    else:
        mem = {"peak_rss_GiB": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20}

    peak = args.peak_tflops if args.peak_tflops is not None else (
        peak_tflops(dev_name) if dev.type == "cuda" else None)
    med = statistics.median(times) if times else float("nan")
    achieved = flops_step / med if times else float("nan")
    report = {
        "device": dev_name,
        "arch": args.arch,
        "img_size": S,
        "params_backbone_M": n_bb / 1e6,
        "params_head_M": n_head / 1e6,
        "batch": f"{B} parents x {V} student views ({n_img} images/step)",
        "precision": "bf16 autocast" if use_bf16 else "fp32",
        "build_s": t_build,
        "timed_steps": len(times),
        "step_s_median": med,
        "step_s_min": min(times) if times else float("nan"),
        "images_per_s": n_img / med if times else float("nan"),
        "fwd_GFLOP_per_image": flops_img / 1e9,
        "TFLOP_per_step": flops_step / 1e12,
        "achieved_TFLOPs": achieved / 1e12,
        "peak_TFLOPs": peak,
        "MFU": (achieved / (peak * 1e12)) if peak else None,
        **mem,
        "loss_first": losses[0] if losses else None,
        "loss_last": losses[-1] if losses else None,
        "total_s": time.perf_counter() - t_start,
    }
    w = max(len(k) for k in report)
    for k, v in report.items():
        if isinstance(v, float):
            v = f"{v:.4g}"
        elif v is None:
            v = "n/a" + (" (pass --peak-tflops)" if k in ("peak_TFLOPs", "MFU") else "")
        print(f"{k:<{w}}  {v}")
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1))
    if bad is not None:
        print(f"FAIL: loss not finite at step {bad[0]}: {bad[1]}")
        return 1
    if not times:
        print("FAIL: no step was timed")
        return 1
    print("OK: all losses finite")
    return 0


if __name__ == "__main__":
    sys.exit(main())
