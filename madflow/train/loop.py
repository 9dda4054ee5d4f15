"""The training loop: one loop for every objective (madflow.train.steps), on CPU, one CUDA
GPU (bf16 autocast) or several processes with DDP when launched by ``torchrun``. Resumes
from ``out_dir/checkpoints/last.pt`` (madflow.train.checkpoint)."""

from __future__ import annotations

import logging
import os
import random
import sys
import time

import numpy as np
import pandas as pd
import torch

from madflow.config import resolve_train_config
from madflow.data.augment import Augmenter
from madflow.data.dataset import MADBatchDataset, MultiCrop
from madflow.data.index import TileIndex, load_tables
from madflow.io import write_atomic
from madflow.model import MADModel, backbone_dim, save_encoder
from madflow.modes import Mode
from madflow.train.checkpoint import TrainLog, load_checkpoint, save_checkpoint
from madflow.train.diagnostics import CUE_COLUMNS, cross_scale_cue
from madflow.train.distributed import finish_distributed, setup_distributed
from madflow.train.schedules import cosine_setting, lr_schedule
from madflow.train.steps import OBJECTIVES, set_lr_wd

log = logging.getLogger("madflow.train")


def encoder_meta(model_cfg: dict, img_size: int, experiment_name: str | None, mode: Mode, seed: int,
                 steps_done: int, backbone, tile_norm: bool) -> dict:
    """What the encoder file says: enough to rebuild the network and its input normalisation."""
    return {
        "arch": model_cfg["arch"],
        "kwargs": dict(model_cfg.get("kwargs") or {}),
        "img_size": int(img_size),
        "embed_dim": int(backbone_dim(backbone)),
        "mode": mode.name,
        "experiment": experiment_name,
        "seed": int(seed),
        "steps": int(steps_done),
        "which": "teacher_backbone",
        "mean": [0.485, 0.456, 0.406],
        "std": [0.229, 0.224, 0.225],
        # input normalisation the embed step must reproduce (madflow.data.augment.normalise)
        "tile_norm": bool(tile_norm),
    }


def augmenter(train_cfg: dict) -> Augmenter:
    return Augmenter(hed_jitter=float(train_cfg["hed_jitter"]), color_jitter=float(train_cfg["color_jitter"]),
                     blur_prob=float(train_cfg["blur_prob"]), tile_norm=bool(train_cfg["tile_norm"]))


def checkpoint_activations(objective) -> None:
    """timm's activation checkpointing in every trained timm network of an objective: a block
    keeps only its input and recomputes its activations in the backward, for ~1/3 more compute
    (what makes ViT-g fit a GPU: docs/cluster.md, bench/memory_per_gpu.py). Same results."""
    for net in [m for m in vars(objective).values() if isinstance(m, torch.nn.Module)]:
        for m in net.modules():
            if hasattr(m, "set_grad_checkpointing") and any(p.requires_grad for p in m.parameters()):
                m.set_grad_checkpointing(True)


def _save_untrained(mode: Mode, model_cfg: dict, train_cfg: dict, img_size: int, out_dir: str,
                    experiment_name: str | None, seed: int, is_main: bool) -> dict:
    """Modes without training: random_init saves the untrained teacher backbone, color_stats
    a meta-only file (the embed step computes colour statistics)."""
    encoder_path = os.path.join(out_dir, "encoder.pt")
    model = None
    if mode.embed == "trained":
        model = MADModel.from_config(model_cfg, img_size)
        backbone = model.teacher.backbone
        meta = encoder_meta(model_cfg, img_size, experiment_name, mode, seed, 0, backbone, train_cfg["tile_norm"])
    else:
        backbone, meta = None, {"mode": mode.name, "experiment": experiment_name, "seed": seed, "img_size": img_size}
    if is_main:
        save_encoder(encoder_path, backbone, meta)
        TrainLog(os.path.join(out_dir, "train_log.tsv")).start(0)
        pd.DataFrame(columns=CUE_COLUMNS).to_csv(os.path.join(out_dir, "cross_scale_cue.tsv"), sep="\t", index=False)
    log.info("mode %s: no training; wrote %s", mode.name, encoder_path)
    return {"mode": mode.name, "steps": 0, "encoder": encoder_path, "model": model}


def train(cfg: dict, experiment: dict, tables: list[str], out_dir: str, seed: int,
          device: str = "auto", experiment_name: str | None = None, stop_after: int | None = None,
          reader_factory=None, init_path: str | None = None) -> dict:
    """Train one experiment and write ``out_dir/encoder.pt``, ``out_dir/train_log.tsv`` and
    ``out_dir/checkpoints/last.pt``. Returns a small summary dict.

    ``stop_after``: stop once that many steps are done, without the final checkpoint or
    encoder (simulates a kill; used by tests). ``reader_factory``: path -> reader with
    ``read_tiles(df)`` (default ``madflow.slides.SlideReader``). ``init_path``: the encoder
    file of the experiment named by the ``init`` setting (stage 2 starts from stage 1)."""
    if not logging.getLogger().handlers:  # called as a library without logging set up
        logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                            format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    mode, train_cfg, model_cfg = resolve_train_config(cfg, experiment)
    if mode.trains and bool(train_cfg.get("init")) != bool(init_path):
        raise ValueError(f"experiment {experiment_name!r}: init {train_cfg.get('init')!r} needs the encoder file of "
                         f"that experiment (init_path / --init), and an init_path needs an init setting")
    if stop_after is None:
        stop_after = train_cfg.get("stop_after")
    world, rank, dev = setup_distributed(device)
    is_main = rank == 0
    seed = int(seed)
    os.makedirs(out_dir, exist_ok=True)
    img_size = int((cfg.get("tiling") or {}).get("tile_px", 224))
    random.seed(seed)
    np.random.seed(seed % (2 ** 32))
    torch.manual_seed(seed)
    if mode.trains:
        index = TileIndex(load_tables(tables), min_purity=float((cfg.get("tiling") or {}).get("min_purity", 0.8)))
        if index.tile_px != img_size:
            log.warning("tile tables have tile_px=%d but tiling.tile_px=%d; using %d",
                        index.tile_px, img_size, index.tile_px)
            img_size = index.tile_px
        run = _Run(mode, train_cfg, model_cfg, index, img_size, out_dir, seed, dev, world, rank, experiment_name)
        if init_path:
            run.objective.load_init(init_path)
            log.info("starting from %s (init: %s)", init_path, train_cfg["init"])
        summary = run.fit(stop_after, reader_factory)
    else:
        summary = _save_untrained(mode, model_cfg, train_cfg, img_size, out_dir, experiment_name, seed, is_main)
    finish_distributed(world)
    return summary


class _Run:
    """One training run of a trainable mode: objective, schedules, resume, loop, outputs."""

    def __init__(self, mode: Mode, train_cfg: dict, model_cfg: dict, index: TileIndex, img_size: int,
                 out_dir: str, seed: int, dev: torch.device, world: int, rank: int, experiment_name: str | None):
        self.mode, self.train_cfg, self.model_cfg = mode, train_cfg, model_cfg
        self.index, self.img_size, self.seed = index, img_size, seed
        self.dev, self.world, self.rank, self.is_main = dev, world, rank, rank == 0
        self.experiment_name = experiment_name
        self.total = total = int(train_cfg["steps"])
        self.encoder_path = os.path.join(out_dir, "encoder.pt")
        self.checkpoint_path = os.path.join(out_dir, "checkpoints", "last.pt")
        self.objective = OBJECTIVES[mode.objective](train_cfg, model_cfg, index, img_size, total, dev, world)
        if train_cfg["activation_checkpointing"]:
            checkpoint_activations(self.objective)
        self.warmup = int(round(float(train_cfg["warmup_frac"]) * total))
        self.lr = lr_schedule(float(train_cfg["lr"]), float(train_cfg["min_lr"]), self.warmup, total)
        self.wd = cosine_setting(train_cfg, "weight_decay", total)
        self.log = TrainLog(os.path.join(out_dir, "train_log.tsv"), enabled=self.is_main)
        self.cue_path = os.path.join(out_dir, "cross_scale_cue.tsv")
        self.cue = pd.DataFrame(columns=CUE_COLUMNS)

    def _resume(self) -> int:
        checkpoint = load_checkpoint(self.checkpoint_path)
        if checkpoint is None:
            self.log.start(0)
            return 0
        self.objective.load_state_dict(checkpoint)
        self.cue = pd.DataFrame(checkpoint.get("cross_scale_cue", []), columns=CUE_COLUMNS)
        start = int(checkpoint["step"])
        sampler = checkpoint.get("sampler", {})
        for what, saved, now in (("seed", sampler.get("seed", self.seed), self.seed),
                                 ("mode", sampler.get("mode", self.mode.name), self.mode.name),
                                 ("total steps", checkpoint.get("total_steps", self.total), self.total)):
            if saved != now:
                log.warning("checkpoint was written with %s %s, this run has %s: batches differ", what, saved, now)
        if checkpoint.get("world_size", self.world) != self.world and self.is_main:
            # the global batch, the step and every schedule go on unchanged; only which parents
            # each rank draws differs (a rank's stream is a function of seed, step and rank)
            log.info("resuming a checkpoint of world size %s at world size %s: same global batch and schedules, "
                     "other per-rank sampler streams", checkpoint["world_size"], self.world)
        (log.info if self.is_main else log.debug)("resuming from step %d (%s)", start, self.checkpoint_path)
        self.log.start(start, checkpoint.get("log_rows"))
        return start

    def _save(self, next_step: int, dataset: MADBatchDataset) -> None:
        if not self.is_main:
            return
        save_checkpoint(self.checkpoint_path, {
            **self.objective.state_dict(),
            "step": int(next_step),
            "total_steps": self.total,
            # batches are a pure function of (seed, step, rank): this is the whole sampler state
            "sampler": {"seed": self.seed, "next_step": int(next_step), "mode": self.mode.name,
                        "groups": dataset.groups},
            "world_size": self.world,
            "log_rows": self.log.rows,
            "cross_scale_cue": self.cue.to_dict("records"),
            "mode": self.mode.name,
            "train_config": self.train_cfg,
            "model_config": self.model_cfg,
        })

    def _loader(self, start: int, reader_factory) -> tuple[MADBatchDataset, torch.utils.data.DataLoader]:
        cfg = self.train_cfg
        batch_parents = int(cfg["batch_parents"])
        if batch_parents % self.world:  # the global batch must not change with the world size
            raise ValueError(f"train.batch_parents={batch_parents} (the global batch) is not divisible by the "
                             f"world size {self.world}")
        dataset = MADBatchDataset(
            self.index, self.mode.name, cfg["pairs"], max(1, batch_parents // self.world), int(cfg["n_local"]),
            self.seed, self.total, start_step=start, rank=self.rank, parent_view=bool(cfg["parent_view"]),
            augmenter=augmenter(cfg), reader_factory=reader_factory,
            same_mag_weight=cosine_setting(cfg, "same_mag_weight", self.total),
            crops=MultiCrop(n_local=int(cfg["n_local"]), global_scale=tuple(cfg["global_crop_scale"]),
                            local_scale=tuple(cfg["local_crop_scale"])))
        loader = torch.utils.data.DataLoader(dataset, batch_size=None, num_workers=int(cfg.get("num_workers") or 0),
                                             pin_memory=self.dev.type == "cuda", persistent_workers=False)
        return dataset, loader

    def fit(self, stop_after: int | None, reader_factory) -> dict:
        from tqdm import tqdm

        objective = self.objective
        start = self._resume()
        cfg = self.train_cfg
        # measured in the main process alone: only EMA centring needs no collective call
        if start == 0 and self.is_main and self.mode.groups in ("pairs", "chain") and \
                (self.world == 1 or cfg["centering"] == "ema"):
            self.cue = cross_scale_cue(objective, self.index, cfg["pairs"], int(cfg["n_local"]), self.seed,
                                       augmenter(cfg), reader_factory, batch_parents=int(cfg["batch_parents"]))
            log.info("cross-scale cue at the start (CE own - other children; < 0: a cue to learn):\n%s",
                     self.cue.to_string(index=False))
        if self.world > 1:
            objective.distribute()
        dataset, loader = self._loader(start, reader_factory)
        every = int(self.train_cfg.get("checkpoint_every") or 0)
        warn_gap, last_warn, collapse_warnings = max(1, self.total // 20), -10 ** 9, 0
        objective.train_mode()
        stats: dict = {}
        step = start
        pbar = tqdm(total=self.total, initial=start, file=sys.stderr, disable=not self.is_main,
                    desc=f"train {self.experiment_name or self.mode.name}", dynamic_ncols=True, mininterval=1.0)
        try:
            t_prev = time.perf_counter()
            for batch in loader:
                step = int(batch["step"])
                if stop_after is not None and step >= int(stop_after):
                    log.info("stopped after %d steps (stop_after); no final checkpoint written", step)
                    return {"mode": self.mode.name, "steps": step, "stopped": True,
                            "model": getattr(objective, "model", None)}
                set_lr_wd(objective.optimizer, float(self.lr[step]), float(self.wd[step]))
                stats = objective.step(batch, step)
                now = time.perf_counter()
                stats = {"step": step, "pair": batch["group"], "lr": float(self.lr[step]),
                         "wd": float(self.wd[step]), **stats, "seconds": now - t_prev}
                t_prev = now
                self.log.append(stats)
                collapsed = objective.collapse_reason(stats)
                if collapsed and step >= self.warmup and step - last_warn >= warn_gap:
                    collapse_warnings += 1
                    last_warn = step
                    if self.is_main:
                        log.warning("possible collapse at step %d: %s (loss %.4f)", step, collapsed, stats["loss"])
                pbar.update(1)
                pbar.set_postfix(**objective.progress(stats), refresh=False)
                if every > 0 and (step + 1) % every == 0 and step + 1 < self.total:
                    self._save(step + 1, dataset)
        finally:
            pbar.close()
            self.log.close()
        return self._finish(dataset, stats, collapse_warnings)

    def _finish(self, dataset: MADBatchDataset, stats: dict, collapse_warnings: int) -> dict:
        self._save(self.total, dataset)
        if self.is_main:
            write_atomic(self.cue_path, lambda tmp: self.cue.to_csv(tmp, sep="\t", index=False))
            backbone, which = self.objective.encoder()
            meta = encoder_meta(self.model_cfg, self.img_size, self.experiment_name, self.mode, self.seed,
                                self.total, backbone, self.train_cfg["tile_norm"])
            save_encoder(self.encoder_path, backbone, {**meta, **which}, head=self.objective.head())
            reason = self.objective.collapse_reason(stats) if stats else None
            if reason:
                log.warning("training ended looking collapsed: %s", reason)
            log.info("wrote %s", self.encoder_path)
        return {"mode": self.mode.name, "steps": self.total, "encoder": self.encoder_path, "last": stats,
                "collapse_warnings": collapse_warnings, "model": getattr(self.objective, "model", None)}
