"""Training settings: the defaults of every `train:` key and how an experiment's overrides
are merged over them. Free of torch, so the Snakefile can check a config at parse time
without paying for the import."""

from __future__ import annotations

import copy

TRAIN_DEFAULTS = {
    "steps": 300,
    "batch_parents": 32,
    "n_local": 4,
    "pairs": {"2.5->10": 0.5, "10->40": 0.5},
    "lr": 1.0e-3,
    "min_lr": 1.0e-5,
    "warmup_frac": 0.1,
    "weight_decay": [0.04, 0.2],
    "clip_grad": 3.0,
    "freeze_last_layer_steps": 20,
    "momentum": [0.99, 1.0],
    "teacher_temp": [0.02, 0.03],
    "teacher_temp_warmup_frac": 0.3,
    "student_temp": 0.1,
    "center_momentum": 0.9,
    "koleo_weight": 0.0,
    "parent_view": True,
    # cross-scale modes: share of batches that are plain same-magnification DINO batches
    # (number, or [start, end] on a cosine over training): keeps the teacher informative
    # while the cross-scale task is still too hard to predict (see README "Findings")
    "same_mag_weight": 0.0,
    "checkpoint_every": 50,
    "num_workers": 1,
    # optional keys (not required in config.yaml)
    "hed_jitter": 0.05,        # HED stain jitter: scale U(1-h, 1+h), shift U(-h, h) per stain
    "color_jitter": 0.1,       # brightness/contrast/saturation factors U(1-c, 1+c)
    "blur_prob": 0.1,          # probability of a light 3x3 Gaussian blur per view
    "tile_norm": False,        # per-tile colour standardisation of every view (and at embedding)
    "centering": "ema",        # "ema" (DINO centre, SPEC default) or "sinkhorn" (SwAV/DINOv2)
    "stop_after": None,        # stop (without final checkpoint) once this many steps are done
    "collapse_min_prototypes": 3,
}

# experiment keys that are not train overrides
_EXPERIMENT_META_KEYS = {"mode", "model", "name", "description", "encoder", "doc"}


def resolve_train_config(cfg: dict, experiment: dict) -> tuple[str, dict, dict]:
    """-> (mode, train config, model config) with the experiment's overrides applied."""
    experiment = dict(experiment or {})
    mode = str(experiment.get("mode", "mad"))
    # a misspelt setting must not be ignored silently: it would change no number and look tried
    known = set(TRAIN_DEFAULTS) | {"seeds"}
    unknown = sorted(set(cfg.get("train") or {}) - known)
    if unknown:
        raise ValueError(f"unknown train setting(s) {unknown}; known: {sorted(known)}")
    if mode not in ("external", "color_stats"):
        unknown = sorted(set(experiment) - known - _EXPERIMENT_META_KEYS)
        if unknown:
            raise ValueError(f"experiment {experiment.get('name', '')!r}: unknown setting(s) {unknown}; "
                             f"an experiment may set mode, model and any train setting {sorted(known)}")
    tcfg = dict(TRAIN_DEFAULTS)
    tcfg.update(copy.deepcopy(cfg.get("train") or {}))
    for k, v in experiment.items():
        if k not in _EXPERIMENT_META_KEYS:
            tcfg[k] = copy.deepcopy(v)
    mcfg = copy.deepcopy(cfg.get("model") or {})
    if isinstance(experiment.get("model"), dict):
        for k, v in experiment["model"].items():
            if isinstance(v, dict) and isinstance(mcfg.get(k), dict):
                mcfg[k] = {**mcfg[k], **v}
            else:
                mcfg[k] = v
    return mode, tcfg, mcfg
