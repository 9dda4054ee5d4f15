"""MAD pretraining: EMA teacher on the low-magnification parent, student on its children.

Runs on CPU, on one CUDA GPU (bf16 autocast) and on several processes with DDP when
launched by ``torchrun`` (WORLD_SIZE/RANK/LOCAL_RANK in the environment). Resumes from
``out_dir/checkpoints/last.pt``; because every batch is a pure function of
(seed, step, rank), a killed and resumed run ends with the same weights as an
uninterrupted one (same device, same thread count).

CLI::

    python -m madflow.train --config resolved.json --experiment mad \
        --tables results/tiles/a.parquet results/tiles/b.parquet --out results/mad/seed0 --seed 0
"""
from __future__ import annotations

import argparse
import csv
import json
import logging
import math
import os
import random
import sys
import time
from contextlib import nullcontext

import numpy as np
import torch
import torch.distributed as dist

from madflow.data import (NETWORK_MODES, Augmenter, MADBatchDataset, TileIndex, load_tables)
from madflow.loss import DINOLoss, koleo_loss, teacher_temp_schedule
from madflow.model import MADModel, atomic_torch_save, backbone_dim, build_backbone, save_encoder
from madflow.train_config import resolve_train_config

log = logging.getLogger("madflow.train")

LOG_COLUMNS = ["step", "pair", "loss", "lr", "wd", "momentum", "teacher_temp", "teacher_entropy",
               "kl_teacher_student", "prototypes_used", "seconds"]


def cosine(start: float, end: float, n: int) -> np.ndarray:
    n = max(int(n), 1)
    t = np.arange(n) / max(n - 1, 1)
    return end + 0.5 * (start - end) * (1 + np.cos(np.pi * t))


def lr_schedule(lr: float, min_lr: float, warmup: int, total: int) -> np.ndarray:
    total = max(int(total), 1)
    warmup = int(min(max(warmup, 0), total))
    s = np.empty(total, dtype=np.float64)
    if warmup:
        s[:warmup] = lr * (np.arange(warmup) + 1) / warmup
    if total > warmup:
        s[warmup:] = cosine(lr, min_lr, total - warmup)
    return s


def _pair2(v, name):
    if isinstance(v, (int, float)):
        return float(v), float(v)
    if len(v) != 2:
        raise ValueError(f"train.{name} must be a number or [start, end]")
    return float(v[0]), float(v[1])


# ---------------------------------------------------------------------------------------
# distributed helpers
# ---------------------------------------------------------------------------------------
def _setup_distributed(device: str):
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise RuntimeError("device 'cuda' requested but CUDA is not available")
        if world > 1 or device == "cuda":
            device = f"cuda:{local_rank}" if world > 1 else "cuda"
        torch.cuda.set_device(torch.device(device))
    if world > 1 and not dist.is_initialized():
        backend = "nccl" if device.startswith("cuda") else "gloo"
        dist.init_process_group(backend=backend)
    return world, rank, torch.device(device)


def _all_reduce_mean(x: torch.Tensor, world: int) -> torch.Tensor:
    if world > 1:
        x = x.clone()
        dist.all_reduce(x)
        x /= world
    return x


# ---------------------------------------------------------------------------------------
# checkpoint
# ---------------------------------------------------------------------------------------
def _rng_state() -> dict:
    st = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        st["cuda"] = torch.cuda.get_rng_state_all()
    return st


def _set_rng_state(st: dict) -> None:
    torch.set_rng_state(st["torch"])
    np.random.set_state(st["numpy"])
    random.setstate(st["python"])
    if "cuda" in st and torch.cuda.is_available():
        try:
            torch.cuda.set_rng_state_all(st["cuda"])
        except Exception:  # noqa: BLE001 - different GPU count
            pass


def _set_lr_wd(opt: torch.optim.Optimizer, lr: float, wd: float) -> None:
    """This step's learning rate, and weight decay on the groups that take it (_param_groups)."""
    for g in opt.param_groups:
        g["lr"] = lr
        if g.get("apply_wd", True):
            g["weight_decay"] = wd


def _param_groups(module: torch.nn.Module):
    reg, noreg = [], []
    for name, p in module.named_parameters():
        if not p.requires_grad:
            continue
        (noreg if (p.ndim <= 1 or name.endswith(".bias")) else reg).append(p)
    return [{"params": reg, "apply_wd": True}, {"params": noreg, "apply_wd": False, "weight_decay": 0.0}]


def _encoder_meta(mcfg: dict, img_size: int, experiment_name: str | None, mode: str, seed: int,
                  steps_done: int, backbone, tile_norm: bool = False) -> dict:
    return {
        "arch": mcfg["arch"],
        "kwargs": dict(mcfg.get("kwargs") or {}),
        "img_size": int(img_size),
        "embed_dim": int(backbone_dim(backbone)) if backbone is not None else None,
        "mode": mode,
        "experiment": experiment_name,
        "seed": int(seed),
        "steps": int(steps_done),
        "which": "teacher_backbone",
        "mean": [0.485, 0.456, 0.406],
        "std": [0.229, 0.224, 0.225],
        # input normalisation the embed step must reproduce (madflow.data.tile_standardise)
        "tile_norm": bool(tile_norm),
    }


# ---------------------------------------------------------------------------------------
# train
# ---------------------------------------------------------------------------------------
def train(cfg: dict, experiment: dict, tables: list[str], out_dir: str, seed: int,
          device: str = "auto", experiment_name: str | None = None, stop_after: int | None = None,
          reader_factory=None) -> dict:
    """Train MAD (or an ablation) and write ``out_dir/encoder.pt``, ``out_dir/train_log.tsv``
    and ``out_dir/checkpoints/last.pt``. Returns a small summary dict.

    ``stop_after``: stop once that many steps are done, without the final checkpoint or
    encoder (simulates a kill; used by tests). ``reader_factory``: path -> reader with
    ``read_tiles(df)`` (default ``madflow.slides.SlideReader``)."""
    if not logging.getLogger().handlers:  # called as a library without logging set up
        logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                            format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    mode, tcfg, mcfg = resolve_train_config(cfg, experiment)
    if stop_after is None:
        stop_after = tcfg.get("stop_after")
    world, rank, dev = _setup_distributed(device)
    is_main = rank == 0
    seed = int(seed)
    os.makedirs(out_dir, exist_ok=True)
    enc_path = os.path.join(out_dir, "encoder.pt")
    log_path = os.path.join(out_dir, "train_log.tsv")
    ckpt_dir = os.path.join(out_dir, "checkpoints")
    ckpt_path = os.path.join(ckpt_dir, "last.pt")
    img_size = int((cfg.get("tiling") or {}).get("tile_px", 224))

    random.seed(seed)
    np.random.seed(seed % (2 ** 32))
    torch.manual_seed(seed)

    # ---- modes without training --------------------------------------------------------
    if mode == "color_stats":
        if is_main:
            save_encoder(enc_path, None, {"mode": mode, "experiment": experiment_name, "seed": seed,
                                          "img_size": img_size})
            _write_log_header(log_path)
        log.info("mode color_stats: no network to train (embed computes colour statistics)")
        _finish_dist(world)
        return {"mode": mode, "steps": 0, "encoder": enc_path}
    if mode == "random_init":
        model = MADModel.from_config(mcfg, img_size)
        if is_main:
            save_encoder(enc_path, model.teacher.backbone,
                         _encoder_meta(mcfg, img_size, experiment_name, mode, seed, 0, model.teacher.backbone,
                                       bool(tcfg["tile_norm"])))
            _write_log_header(log_path)
        log.info("mode random_init: saved the untrained teacher backbone to %s", enc_path)
        _finish_dist(world)
        return {"mode": mode, "steps": 0, "encoder": enc_path, "model": model}
    if mode not in NETWORK_MODES:
        raise ValueError(f"unknown experiment mode {mode!r}")

    # ---- data ----------------------------------------------------------------------------
    index = TileIndex(load_tables(tables), min_purity=float((cfg.get("tiling") or {}).get("min_purity", 0.8)))
    if index.tile_px != img_size:
        log.warning("tile tables have tile_px=%d but tiling.tile_px=%d; using %d",
                    index.tile_px, img_size, index.tile_px)
        img_size = index.tile_px
    total = int(tcfg["steps"])
    B_total = int(tcfg["batch_parents"])
    if B_total % world:
        log.warning("batch_parents=%d is not divisible by world size %d", B_total, world)
    B = max(1, B_total // world)
    n_local = int(tcfg["n_local"])

    if mode == "supervised":
        if world > 1:
            raise ValueError("the supervised control runs in one process (it is a small calibration run)")
        out = _train_supervised(tcfg, mcfg, index, img_size, seed, dev, out_dir, experiment_name,
                                reader_factory, stop_after)
        _finish_dist(world)
        return out

    # ---- model, loss, optimiser ------------------------------------------------------------
    model = MADModel.from_config(mcfg, img_size).to(dev)
    K = int(model.student.head.n_prototypes)
    tt0, tt1 = _pair2(tcfg["teacher_temp"], "teacher_temp")
    tt_sched = teacher_temp_schedule(tt0, tt1, int(round(float(tcfg["teacher_temp_warmup_frac"]) * total)), total)
    dino_loss = DINOLoss(K, float(tcfg["student_temp"]), tt_sched, float(tcfg["center_momentum"]),
                         centering=str(tcfg.get("centering", "ema"))).to(dev)
    opt = torch.optim.AdamW(_param_groups(model.student), lr=float(tcfg["lr"]), betas=(0.9, 0.999))
    warmup = int(round(float(tcfg["warmup_frac"]) * total))
    lr_s = lr_schedule(float(tcfg["lr"]), float(tcfg["min_lr"]), warmup, total)
    wd_s = cosine(*_pair2(tcfg["weight_decay"], "weight_decay"), total)
    mom_s = cosine(*_pair2(tcfg["momentum"], "momentum"), total)

    # ---- resume ------------------------------------------------------------------------------
    start = 0
    log_rows: list[list[str]] = []  # also kept in the checkpoint: Snakemake deletes a failed job's log
    if os.path.isfile(ckpt_path):
        ck = torch.load(ckpt_path, map_location="cpu", weights_only=False)
        model.student.load_state_dict(ck["student"])
        model.teacher.load_state_dict(ck["teacher"])
        opt.load_state_dict(ck["optimizer"])
        dino_loss.load_state_dict(ck["loss"])
        start = int(ck["step"])
        log_rows = [list(r) for r in ck.get("log_rows", []) if int(r[0]) < start]
        _set_rng_state(ck["rng"])
        smp = ck.get("sampler", {})
        if smp.get("seed", seed) != seed or smp.get("mode", mode) != mode:
            log.warning("checkpoint sampler state (seed %s, mode %s) differs from this run (seed %s, mode %s)",
                        smp.get("seed"), smp.get("mode"), seed, mode)
        if ck.get("world_size", world) != world:
            log.warning("checkpoint was written with world size %s, resuming with %s: data order differs",
                        ck.get("world_size"), world)
        if ck.get("total_steps", total) != total:
            log.warning("checkpoint was written for %s steps, now %s", ck.get("total_steps"), total)
        (log.info if is_main else log.debug)("resuming from step %d (%s)", start, ckpt_path)
    if is_main:
        _prepare_log(log_path, start, log_rows)

    student = model.student
    if world > 1:
        from torch.nn.parallel import DistributedDataParallel as DDP

        # batch statistics of a BN head must be those of the global batch
        model.student = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model.student)
        model.teacher = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model.teacher)
        student = DDP(model.student, device_ids=[dev.index] if dev.type == "cuda" else None)

    ds = MADBatchDataset(
        index, mode, tcfg["pairs"], B, n_local, seed, total, start_step=start, rank=rank,
        parent_view=bool(tcfg["parent_view"]),
        augmenter=_augmenter(tcfg),
        reader_factory=reader_factory,
        same_mag_weight=cosine(*_pair2(tcfg["same_mag_weight"], "same_mag_weight"), total))
    nw = int(tcfg.get("num_workers") or 0)
    loader = torch.utils.data.DataLoader(ds, batch_size=None, num_workers=nw,
                                         pin_memory=dev.type == "cuda",
                                         persistent_workers=False)
    autocast = (torch.autocast(device_type="cuda", dtype=torch.bfloat16) if dev.type == "cuda"
                else nullcontext())
    koleo_w = float(tcfg.get("koleo_weight") or 0.0)
    freeze = int(tcfg.get("freeze_last_layer_steps") or 0)
    clip = float(tcfg.get("clip_grad") or 0.0)
    every = int(tcfg.get("checkpoint_every") or 0)
    min_protos = min(int(tcfg.get("collapse_min_prototypes", 3)), B_total)
    warn_gap = max(1, total // 20)
    last_warn = -10 ** 9
    collapse_warnings = 0
    last_params = [p for n, p in model.student.named_parameters() if "last_layer" in n]

    def save_ckpt(next_step: int):
        if not is_main:
            return
        atomic_torch_save({
            "step": int(next_step),
            "total_steps": total,
            "student": model.student.state_dict(),
            "teacher": model.teacher.state_dict(),
            "optimizer": opt.state_dict(),
            "loss": dino_loss.state_dict(),
            "rng": _rng_state(),
            # batches are a pure function of (seed, step, rank): this is the whole sampler state
            "sampler": {"seed": seed, "next_step": int(next_step), "mode": mode, "groups": ds.groups},
            "world_size": world,
            "log_rows": log_rows,
            "mode": mode,
            "train_config": tcfg,
            "model_config": mcfg,
        }, ckpt_path)

    from tqdm import tqdm

    pbar = tqdm(total=total, initial=start, file=sys.stderr, disable=not is_main,
                desc=f"train {experiment_name or mode}", dynamic_ncols=True, mininterval=1.0)
    logf = open(log_path, "a", newline="") if is_main else None
    writer = csv.writer(logf, delimiter="\t", lineterminator="\n") if logf else None
    model.student.train()
    model.teacher.train()
    last = {}
    stopped_early = False
    step = start
    try:
        t_prev = time.perf_counter()
        for batch in loader:
            step = int(batch["step"])
            if stop_after is not None and step >= int(stop_after):
                stopped_early = True
                break
            _set_lr_wd(opt, float(lr_s[step]), float(wd_s[step]))
            tin = batch["teacher"].to(dev, non_blocking=True)
            sin = batch["student"].to(dev, non_blocking=True)
            Bn, V = sin.shape[:2]
            with autocast:
                with torch.no_grad():
                    t_out = model.teacher(tin)
                feats, s_out = student(sin.flatten(0, 1), return_features=True)
            s_out = s_out.float().view(Bn, V, -1)
            loss = dino_loss(s_out, t_out.float(), step)
            total_loss = loss
            if koleo_w > 0:
                f = feats.float().view(Bn, V, -1)
                total_loss = total_loss + koleo_w * sum(koleo_loss(f[:, v]) for v in range(V)) / V
            opt.zero_grad(set_to_none=True)
            total_loss.backward()
            if clip > 0:
                torch.nn.utils.clip_grad_norm_(model.student.parameters(), clip)
            if step < freeze:
                for p in last_params:
                    p.grad = None
            opt.step()
            model.update_teacher(float(mom_s[step]))

            # ---- statistics (averaged over ranks) ----
            st = dino_loss.last_stats
            vec = torch.stack([total_loss.detach().float(), st["teacher_entropy"].float(),
                               st["kl_teacher_student"].float()])
            vec = _all_reduce_mean(vec, world).cpu()
            counts = torch.bincount(st["teacher_argmax"], minlength=K).float()
            if world > 1:
                dist.all_reduce(counts)
            used = int((counts > 0).sum())
            now = time.perf_counter()
            last = {"step": step, "pair": batch["group"], "loss": float(vec[0]), "lr": float(lr_s[step]),
                    "wd": float(wd_s[step]), "momentum": float(mom_s[step]),
                    "teacher_temp": float(dino_loss.teacher_temp(step)),
                    "teacher_entropy": float(vec[1]), "kl_teacher_student": float(vec[2]),
                    "prototypes_used": used, "seconds": now - t_prev}
            t_prev = now
            if writer:
                log_rows.append([_fmt(last[c]) for c in LOG_COLUMNS])
                writer.writerow(log_rows[-1])
                logf.flush()
            collapsed = _collapse_reason(last, K, min_protos)
            if collapsed and step >= warmup and step - last_warn >= warn_gap:
                collapse_warnings += 1
                last_warn = step
                if is_main:
                    log.warning("possible collapse at step %d: %s (loss %.4f)", step, collapsed, last["loss"])
            pbar.update(1)
            pbar.set_postfix(loss=f"{last['loss']:.3f}", H=f"{last['teacher_entropy']:.2f}", used=used,
                             refresh=False)
            if every > 0 and (step + 1) % every == 0 and step + 1 < total:
                save_ckpt(step + 1)
    finally:
        pbar.close()
        if logf:
            logf.close()

    if stopped_early:
        log.info("stopped after %d steps (stop_after); no final checkpoint written", step)
        _finish_dist(world)
        return {"mode": mode, "steps": step, "stopped": True, "model": model}

    done = total
    save_ckpt(done)
    if is_main:
        save_encoder(enc_path, model.teacher.backbone,
                     _encoder_meta(mcfg, img_size, experiment_name, mode, seed, done, model.teacher.backbone,
                                   bool(tcfg["tile_norm"])))
        reason = _collapse_reason(last, K, min_protos) if last else None
        if reason:
            log.warning("training ended looking collapsed: %s", reason)
        log.info("wrote %s", enc_path)
    _finish_dist(world)
    return {"mode": mode, "steps": done, "encoder": enc_path, "last": last,
            "collapse_warnings": collapse_warnings, "model": model}


def _augmenter(tcfg: dict) -> Augmenter:
    return Augmenter(hed_jitter=float(tcfg["hed_jitter"]), color_jitter=float(tcfg["color_jitter"]),
                     blur_prob=float(tcfg["blur_prob"]), tile_norm=bool(tcfg["tile_norm"]))


def _train_supervised(tcfg: dict, mcfg: dict, index: TileIndex, img_size: int, seed: int, dev,
                      out_dir: str, experiment_name: str | None, reader_factory, stop_after) -> dict:
    """The benchmark's positive control: the same backbone, augmentation, schedule and images
    per step, trained by cross-entropy on the class labels of pure tiles at the magnifications
    of ``pairs`` through a linear classifier. It uses labels, so it calibrates the metrics
    (what an encoder that learnt the classes at every scale scores); it is not a competitor."""
    classes = sorted(index.df["label"].dropna().astype(str).unique()) if "label" in index.df.columns else []
    if not classes:
        raise ValueError("the supervised control needs labelled tiles; the tile tables have no labels")
    codes = index.df["label"].astype("string").map({c: n for n, c in enumerate(classes)})
    codes = torch.tensor(codes.fillna(-1).to_numpy(dtype=np.int64))
    backbone = build_backbone(mcfg["arch"], mcfg.get("kwargs") or {}, mcfg.get("checkpoint"), img_size)
    net = torch.nn.Sequential(backbone, torch.nn.Linear(backbone_dim(backbone), len(classes))).to(dev)
    total = int(tcfg["steps"])
    opt = torch.optim.AdamW(_param_groups(net), lr=float(tcfg["lr"]), betas=(0.9, 0.999))
    lr_s = lr_schedule(float(tcfg["lr"]), float(tcfg["min_lr"]), int(round(float(tcfg["warmup_frac"]) * total)), total)
    wd_s = cosine(*_pair2(tcfg["weight_decay"], "weight_decay"), total)
    enc_path = os.path.join(out_dir, "encoder.pt")
    log_path = os.path.join(out_dir, "train_log.tsv")
    ckpt_path = os.path.join(out_dir, "checkpoints", "last.pt")
    start, log_rows = 0, []
    if os.path.isfile(ckpt_path):
        ck = torch.load(ckpt_path, map_location="cpu", weights_only=False)
        net.load_state_dict(ck["net"])
        opt.load_state_dict(ck["optimizer"])
        start, log_rows = int(ck["step"]), [list(r) for r in ck["log_rows"] if int(r[0]) < int(ck["step"])]
        _set_rng_state(ck["rng"])
        log.info("resuming the supervised control from step %d (%s)", start, ckpt_path)
    _prepare_log(log_path, start, log_rows)
    ds = MADBatchDataset(
        index, "supervised", tcfg["pairs"], int(tcfg["batch_parents"]), int(tcfg["n_local"]), seed, total,
        start_step=start, parent_view=False, reader_factory=reader_factory,
        augmenter=_augmenter(tcfg))
    loader = torch.utils.data.DataLoader(ds, batch_size=None, num_workers=int(tcfg.get("num_workers") or 0))
    every = int(tcfg.get("checkpoint_every") or 0)
    clip = float(tcfg.get("clip_grad") or 0.0)

    def save_ckpt(next_step: int):
        atomic_torch_save({"step": next_step, "net": net.state_dict(), "optimizer": opt.state_dict(),
                           "rng": _rng_state(), "log_rows": log_rows, "classes": classes}, ckpt_path)

    from tqdm import tqdm

    net.train()
    step = start
    with open(log_path, "a", newline="") as logf, \
            tqdm(total=total, initial=start, file=sys.stderr, desc=f"train {experiment_name or 'supervised'}",
                 dynamic_ncols=True, mininterval=1.0) as pbar:
        writer = csv.writer(logf, delimiter="\t", lineterminator="\n")
        t_prev = time.perf_counter()
        for batch in loader:
            step = int(batch["step"])
            if stop_after is not None and step >= int(stop_after):
                return {"mode": "supervised", "steps": step, "stopped": True}
            _set_lr_wd(opt, float(lr_s[step]), float(wd_s[step]))
            loss = torch.nn.functional.cross_entropy(net(batch["teacher"].to(dev)), codes[batch["parents"]].to(dev))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if clip > 0:
                torch.nn.utils.clip_grad_norm_(net.parameters(), clip)
            opt.step()
            now = time.perf_counter()
            loss_value = float(loss.detach())
            # the DINO columns do not apply: left empty
            row = {"step": step, "pair": batch["group"], "loss": loss_value, "lr": float(lr_s[step]),
                   "wd": float(wd_s[step]), "seconds": now - t_prev}
            t_prev = now
            log_rows.append([_fmt(row[c]) if c in row else "" for c in LOG_COLUMNS])
            writer.writerow(log_rows[-1])
            logf.flush()
            pbar.update(1)
            pbar.set_postfix(loss=f"{loss_value:.3f}", refresh=False)
            if every > 0 and (step + 1) % every == 0 and step + 1 < total:
                save_ckpt(step + 1)
    save_ckpt(total)
    save_encoder(enc_path, backbone, {**_encoder_meta(mcfg, img_size, experiment_name, "supervised", seed, total,
                                                      backbone, bool(tcfg["tile_norm"])), "which": "backbone", "classes": classes})
    log.info("wrote %s (supervised control, %d classes)", enc_path, len(classes))
    return {"mode": "supervised", "steps": total, "encoder": enc_path}


def _collapse_reason(row: dict, K: int, min_protos: int) -> str | None:
    reasons = []
    if row["teacher_entropy"] >= 0.95 * math.log(K):
        reasons.append(f"teacher entropy {row['teacher_entropy']:.3f} within 5% of ln K = {math.log(K):.3f} "
                       f"(uniform teacher)")
    if row["prototypes_used"] < min_protos:
        reasons.append(f"only {row['prototypes_used']} prototype(s) used in the batch (one-prototype collapse)")
    return "; ".join(reasons) or None


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.6g}"
    return str(v)


def _write_log_header(path: str) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.write("\t".join(LOG_COLUMNS) + "\n")
    os.replace(tmp, path)


def _prepare_log(path: str, start: int, rows: list[list[str]] | None = None) -> None:
    """Fresh log with a header; on resume the rows of steps < start, taken from the
    checkpoint (the file itself may have been deleted by Snakemake after a kill)."""
    lines = ["\t".join(LOG_COLUMNS)]
    if start > 0:
        if rows:
            lines += ["\t".join(r) for r in rows if int(r[0]) < start]
        elif os.path.isfile(path):  # checkpoint without rows: keep what the file has
            with open(path) as f:
                for ln in f.read().splitlines()[1:]:
                    try:
                        if int(ln.split("\t", 1)[0]) < start:
                            lines.append(ln)
                    except ValueError:
                        continue
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.write("\n".join(lines) + "\n")
    os.replace(tmp, path)


def _finish_dist(world: int) -> None:
    if world > 1 and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


# ---------------------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------------------
def _load_config(path: str) -> dict:
    with open(path) as f:
        text = f.read()
    if path.endswith((".yaml", ".yml")):
        import yaml

        cfg = yaml.safe_load(text)
    else:
        cfg = json.loads(text)
    # the workflow's per-experiment config.json is a provenance record {"config": {...}, ...}
    if isinstance(cfg, dict) and "train" not in cfg and isinstance(cfg.get("config"), dict):
        cfg = cfg["config"]
    return cfg


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m madflow.train", description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", required=True, help="resolved config (JSON or YAML)")
    ap.add_argument("--experiment", required=True, help="name under config 'experiments'")
    ap.add_argument("--tables", nargs="+", required=True, help="tile tables (parquet) of the train slides")
    ap.add_argument("--out", required=True, help="output directory")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default="auto", help="auto | cpu | cuda")
    ap.add_argument("--stop-after", type=int, default=None, help="stop after this many steps (testing)")
    ap.add_argument("--log-level", default="INFO")
    a = ap.parse_args(argv)
    logging.basicConfig(level=getattr(logging, a.log_level.upper(), logging.INFO), stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    cfg = _load_config(a.config)
    exps = cfg.get("experiments") or {}
    if a.experiment not in exps:
        ap.error(f"experiment {a.experiment!r} not in config (have {sorted(exps)})")
    summary = train(cfg, exps[a.experiment] or {}, a.tables, a.out, a.seed, device=a.device,
                    experiment_name=a.experiment, stop_after=a.stop_after)
    if int(os.environ.get("RANK", "0")) == 0:
        log.info("done: %s", {k: v for k, v in summary.items() if k not in ("last", "model")})
    return 0


if __name__ == "__main__":
    sys.exit(main())
