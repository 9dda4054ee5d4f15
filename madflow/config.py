"""Training settings: the one place that holds the default of every `train:` key, and how an
experiment's overrides are merged over `train:` and `model:`. Free of torch, so the
Snakefile can check a config when it parses it. docs/config.md describes every key."""

from __future__ import annotations

import copy

from madflow.modes import Mode, get_mode

TRAIN_DEFAULTS = {
    "steps": 400,
    "batch_parents": 32,
    "n_local": 4,
    "pairs": {"2.5->10": 0.5, "10->40": 0.5},
    "lr": 1.0e-3,
    "min_lr": 1.0e-5,
    "warmup_frac": 0.1,
    "weight_decay": [0.04, 0.2],
    "clip_grad": 3.0,
    "freeze_last_layer_steps": 20,
    "momentum": [0.994, 1.0],
    "teacher_temp": [0.04, 0.07],
    "teacher_temp_warmup_frac": 0.3,
    "student_temp": 0.1,
    "center_momentum": 0.9,
    "koleo_weight": 0.0,
    # weight of the first-moment term between the children's and the parents' mean CLS token
    # (cross-scale modes; beyond the paper, aimed at the per-magnification offset: on the demo's
    # seed 0 it closed the offset in training batches and widened it on held-out tiles)
    "moment_weight": 0.0,
    # a batch-normalised head: "batch" normalises with each batch's statistics (DINO); "running"
    # uses the statistics of the start (stage 1), frozen, so that student and teacher, whose
    # batches hold different magnifications, are normalised alike
    "head_bn": "batch",
    # the student also sees an augmented view of the parent (DINO's global-global term)
    "parent_view": True,
    # cross-scale modes: "parent" = the teacher sees the parent only; "all" = it also scores the
    # student's children and parent views, each view learning from every other (needs parent_view)
    "teacher_views": "parent",
    # cross-scale modes: share of batches that are plain same-magnification DINO batches
    # (number, or [start, end] on a cosine over training)
    "same_mag_weight": 0.0,
    # stage 2 starts from the encoder (backbone and DINO head) of this experiment (stage 1)
    "init": None,
    # multi-crop (mode dino): area shares of the global and the n_local local crops
    "global_crop_scale": [0.5, 1.0],
    "local_crop_scale": [0.1, 0.4],
    "checkpoint_every": 50,
    # timm's activation checkpointing of the student's backbone: memory for ~1/3 more compute
    # (ViT-g at the paper's batch needs it: docs/cluster.md)
    "activation_checkpointing": False,
    "num_workers": 1,
    "hed_jitter": 0.05,        # HED stain jitter: scale U(1-h, 1+h), shift U(-h, h) per stain
    "color_jitter": 0.1,       # brightness/contrast/saturation factors U(1-c, 1+c)
    "blur_prob": 0.1,          # probability of a light 3x3 Gaussian blur per view
    "tile_norm": True,         # per-tile colour standardisation of every view (and at embedding)
    "centering": "ema",        # "ema" (DINO centre) or "sinkhorn" (SwAV/DINOv2)
    "stop_after": None,        # stop (without final checkpoint) once this many steps are done
    "collapse_min_prototypes": 3,
    # mixed precision of the step: auto = bf16 autocast on CUDA, fp32 on CPU (measured faster
    # there at the demo's size: bench/bench_train.py); fp32 | bf16 force one everywhere
    "precision": "auto",
    # torch.compile of the student and teacher forward: auto = on CUDA only (on the demo's CPU
    # step it was 1.04x faster after 44 s of compilation); true | false
    "compile": "auto",
    "seeds": [0],              # training seeds of the default run (the workflow's, not train()'s)
}

# experiment keys that are not train overrides
_EXPERIMENT_META_KEYS = {"mode", "model", "name", "description", "encoder", "doc"}


def deep_merge(base: dict, new: dict) -> dict:
    """``new`` merged into ``base`` in place, mapping by mapping (what --configfile layering does)."""
    for key, value in new.items():
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            deep_merge(base[key], value)
        else:
            base[key] = copy.deepcopy(value)
    return base


def resolve_train_config(cfg: dict, experiment: dict) -> tuple[Mode, dict, dict]:
    """-> (mode, train settings, model settings) of one experiment: TRAIN_DEFAULTS, then the
    config's `train:`, then the experiment's own overrides (model settings merged per key)."""
    experiment = dict(experiment or {})
    mode = get_mode(experiment.get("mode"))
    # a misspelt setting must not be ignored silently: it would change no number and look tried
    known = set(TRAIN_DEFAULTS)
    unknown = sorted(set(cfg.get("train") or {}) - known)
    if unknown:
        raise ValueError(f"unknown train setting(s) {unknown}; known: {sorted(known)}")
    if mode.pretrain_job:
        unknown = sorted(set(experiment) - known - _EXPERIMENT_META_KEYS)
        if unknown:
            raise ValueError(f"experiment {experiment.get('name', '')!r}: unknown setting(s) {unknown}; "
                             f"an experiment may set mode, model and any train setting {sorted(known)}")
    init = experiment.get("init", (cfg.get("train") or {}).get("init"))
    if init is not None and mode.trains:
        others = cfg.get("experiments") or {}
        if init == experiment.get("name") or init not in others or not get_mode(others[init].get("mode")).trains:
            raise ValueError(f"experiment {experiment.get('name', '')!r}: init {init!r} must name another "
                             f"experiment that trains a network")
        _check_init_chain(cfg, experiment.get("name"), init)
    train_cfg = copy.deepcopy(TRAIN_DEFAULTS)
    train_cfg.update(copy.deepcopy(cfg.get("train") or {}))
    for key, value in experiment.items():
        if key not in _EXPERIMENT_META_KEYS:
            train_cfg[key] = copy.deepcopy(value)
    model_cfg = copy.deepcopy(cfg.get("model") or {})
    for key, value in (experiment.get("model") or {}).items():
        if isinstance(value, dict) and isinstance(model_cfg.get(key), dict):
            model_cfg[key] = {**model_cfg[key], **value}
        else:
            model_cfg[key] = value
    return mode, train_cfg, model_cfg


def _check_init_chain(cfg: dict, name, init) -> None:
    """Follow `init` from experiment to experiment: a cycle (a starts from b, b from a) is an
    error naming the experiments, before Snakemake reports a cyclic dependency of a rule."""
    chain, others = [name], cfg.get("experiments") or {}
    default = (cfg.get("train") or {}).get("init")
    while init is not None and init in others and get_mode(others[init].get("mode")).trains:
        if init in chain:
            cycle = chain[chain.index(init):] + [init]
            raise ValueError(f"experiments {' -> '.join(map(repr, cycle))}: their init settings form a cycle "
                             "(each starts from the next's encoder); one of them must start without init")
        chain.append(init)
        init = others[init].get("init", default)

