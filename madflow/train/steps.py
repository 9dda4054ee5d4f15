"""Training objectives: what one optimisation step does, one class per objective.

An objective owns its networks, loss and optimiser, does one step on a batch of
``madflow.data.dataset.MADBatchDataset`` (``step``), and says what to checkpoint and which
backbone becomes the encoder. The training loop, the benches and the studies all call
these same steps. ``OBJECTIVES`` maps the registry's ``Mode.objective`` names to them.
"""

from __future__ import annotations

import logging
import math
from contextlib import nullcontext

import numpy as np
import torch
import torch.nn.functional as F

from madflow.data.index import TileIndex
from madflow.loss import DINOLoss, koleo_loss, teacher_temp_schedule
from madflow.model import MADModel, backbone_dim, build_backbone
from madflow.train.distributed import all_reduce_mean, all_reduce_sum
from madflow.train.schedules import cosine_setting, start_end


def param_groups(module: torch.nn.Module) -> list[dict]:
    """AdamW groups: weight decay on weight matrices only (not on biases, norms, tokens)."""
    decayed, not_decayed = [], []
    for name, p in module.named_parameters():
        if not p.requires_grad:
            continue
        (not_decayed if (p.ndim <= 1 or name.endswith(".bias")) else decayed).append(p)
    return [{"params": decayed, "apply_wd": True},
            {"params": not_decayed, "apply_wd": False, "weight_decay": 0.0}]


def set_lr_wd(optimizer: torch.optim.Optimizer, lr: float, wd: float) -> None:
    """This step's learning rate, and weight decay on the groups that take it."""
    for group in optimizer.param_groups:
        group["lr"] = lr
        if group.get("apply_wd", True):
            group["weight_decay"] = wd


def autocast_context(train_cfg: dict, device: torch.device):
    """The step's mixed precision (`train.precision`): "auto" is bf16 autocast on CUDA and fp32
    on CPU, where a bf16 step of the demo model measured slower than fp32 (bench/bench_train.py:
    the casts around small matrices cost more than the faster bf16 products save)."""
    precision = str(train_cfg.get("precision", "auto"))
    if precision not in ("auto", "fp32", "bf16"):
        raise ValueError(f"train.precision must be auto, fp32 or bf16, not {precision!r}")
    if precision == "fp32" or (precision == "auto" and device.type != "cuda"):
        return nullcontext()
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16)


def compiled(module: torch.nn.Module, train_cfg: dict, device: torch.device):
    """The module's forward compiled by torch.compile (inductor) when `train.compile` asks for it:
    "auto" compiles on CUDA only (on CPU the demo step ran 1.04x faster after 44 s of compilation:
    bench/bench_train.py); "true" everywhere. Parameters and state dicts stay the module's own.
    Where no compiler works, the first step falls back to the plain module, with a warning."""
    choice = str(train_cfg.get("compile", "auto")).lower()
    if choice not in ("auto", "true", "false"):
        raise ValueError(f"train.compile must be auto, true or false, not {choice!r}")
    if choice == "false" or (choice == "auto" and device.type != "cuda"):
        return module
    return _CompiledWithFallback(module)


class _CompiledWithFallback:
    """Calls torch.compile(module); if compiling fails (no C++ compiler, an unsupported op),
    logs why once and calls the module itself from then on."""

    def __init__(self, module: torch.nn.Module):
        self.module, self.fn = module, torch.compile(module)

    def __call__(self, *args, **kwargs):
        if self.fn is not self.module:
            try:
                return self.fn(*args, **kwargs)
            except Exception as err:  # noqa: BLE001 - inductor raises many kinds; the fallback is the module
                logging.getLogger("madflow.train").warning("torch.compile failed, training uncompiled: %s",
                                                           str(err).splitlines()[0] if str(err) else type(err))
                self.fn = self.module
        return self.module(*args, **kwargs)


def batch_offset(teacher_features: torch.Tensor, student_features: torch.Tensor) -> torch.Tensor:
    """Squared distance between the mean L2-normalised CLS token of the teacher's views (the
    parents, one magnification) and of the student's child views (the next magnification):
    the batch's per-magnification offset. Its square root is logged every step (`mag_offset`);
    `moment_weight` adds it to the loss (a first-moment term beyond the paper that pulls the
    children's mean onto the teacher's in the batch). Gradients flow into the student only."""
    parent_mean = F.normalize(teacher_features.detach().float(), dim=-1).mean(0)
    child_mean = F.normalize(student_features.float().flatten(0, -2), dim=-1).mean(0)
    return (child_mean - parent_mean).pow(2).sum()


class DINOObjective:
    """Teacher-student distillation (MAD and every DINO-style ablation): the EMA teacher sees
    the batch's ``teacher`` views, the student its ``student`` views; loss = mean over views of
    CE(centred, sharpened teacher, student), plus an optional KoLeo term."""

    log_name = "dino"

    def __init__(self, train_cfg: dict, model_cfg: dict, index: TileIndex, img_size: int,
                 total: int, device: torch.device, world: int = 1):
        self.model = MADModel.from_config(model_cfg, img_size).to(device)
        self.n_prototypes = K = int(self.model.student.head.n_prototypes)
        t0, t1 = start_end(train_cfg["teacher_temp"], "teacher_temp")
        warmup = int(round(float(train_cfg["teacher_temp_warmup_frac"]) * total))
        self.loss = DINOLoss(K, float(train_cfg["student_temp"]), teacher_temp_schedule(t0, t1, warmup, total),
                             float(train_cfg["center_momentum"]),
                             centering=str(train_cfg.get("centering", "ema"))).to(device)
        self.optimizer = torch.optim.AdamW(param_groups(self.model.student), lr=float(train_cfg["lr"]),
                                           betas=(0.9, 0.999))
        self.momentum = cosine_setting(train_cfg, "momentum", total)
        self.koleo_weight = float(train_cfg.get("koleo_weight") or 0.0)
        self.moment_weight = float(train_cfg.get("moment_weight") or 0.0)
        self.parent_view = bool(train_cfg.get("parent_view", True))
        self.teacher_views = str(train_cfg.get("teacher_views", "parent"))
        if self.teacher_views not in ("parent", "all") or (self.teacher_views == "all" and not self.parent_view):
            raise ValueError(f"train.teacher_views must be 'parent' or 'all' (which needs parent_view: true), "
                             f"not {self.teacher_views!r}")
        self.freeze_last_layer_steps = int(train_cfg.get("freeze_last_layer_steps") or 0)
        self.clip = float(train_cfg.get("clip_grad") or 0.0)
        self.head_bn = str(train_cfg.get("head_bn", "batch"))
        if self.head_bn not in ("batch", "running"):
            raise ValueError(f"head_bn must be 'batch' or 'running', not {self.head_bn!r}")
        self.min_prototypes = min(int(train_cfg.get("collapse_min_prototypes", 3)), int(train_cfg["batch_parents"]))
        self.last_layer = [p for n, p in self.model.student.named_parameters() if "last_layer" in n]
        self.device, self.world = device, world
        self.train_cfg = train_cfg
        self.student = compiled(self.model.student, train_cfg, device)  # DDP-wrapped by distribute()
        self.teacher = compiled(self.model.teacher, train_cfg, device)
        self.autocast = autocast_context(train_cfg, device)

    def distribute(self) -> None:
        """Wrap the student for DDP; on GPUs a BN head's statistics become those of the global batch."""
        from torch.nn.parallel import DistributedDataParallel as DDP

        if self.device.type == "cuda":  # SyncBatchNorm runs on GPU modules only; on CPU each rank keeps its own
            self.model.student = torch.nn.SyncBatchNorm.convert_sync_batchnorm(self.model.student)
            self.model.teacher = torch.nn.SyncBatchNorm.convert_sync_batchnorm(self.model.teacher)
        self.student = compiled(DDP(self.model.student, device_ids=[self.device.index] if self.device.type == "cuda"
                                    else None), self.train_cfg, self.device)
        self.teacher = compiled(self.model.teacher, self.train_cfg, self.device)

    def train_mode(self) -> None:
        """Student in train mode; the teacher in eval mode as in DINOv2, unless its head has
        batch norm with batch statistics (``head_bn: batch``, DINO), which then come from the
        teacher's own batch. With ``head_bn: running`` every BN layer, student's and teacher's,
        normalises with the frozen statistics of the start: each batch holds one magnification
        of parents (teacher) and mostly children (student), and batch statistics would absorb
        a constant offset between the two magnifications that the backbone then never removes."""
        self.model.student.train()
        bn_layers = [m for m in self.model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
        batch_stats = bool(bn_layers) and self.head_bn == "batch"
        self.model.teacher.train(batch_stats)
        for m in bn_layers:
            m.train(batch_stats)

    def load_init(self, path: str) -> None:
        """Start from another experiment's encoder (stage 2 from stage 1): its backbone, and
        its DINO head when the file holds one, in both student and teacher."""
        state = torch.load(path, map_location="cpu", weights_only=True)
        for net in (self.model.student, self.model.teacher):
            net.backbone.load_state_dict(state["state_dict"])
            if state.get("head_state_dict") is not None:
                net.head.load_state_dict(state["head_state_dict"])

    def state_dict(self) -> dict:
        return {"student": self.model.student.state_dict(), "teacher": self.model.teacher.state_dict(),
                "optimizer": self.optimizer.state_dict(), "loss": self.loss.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.model.student.load_state_dict(state["student"])
        self.model.teacher.load_state_dict(state["teacher"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.loss.load_state_dict(state["loss"])

    def encoder(self) -> tuple[torch.nn.Module, dict]:
        """The backbone that becomes the encoder, and what the encoder file says of it: the
        share of the teacher's weights still from its start (product of the EMA momenta)."""
        return self.model.teacher.backbone, {"which": "teacher_backbone",
                                             "teacher_initial_share": float(np.prod(self.momentum))}

    def head(self) -> torch.nn.Module:
        return self.model.teacher.head

    def step(self, batch: dict, step: int) -> dict:
        """One optimisation step and one EMA update of the teacher; -> this step's statistics."""
        teacher_in = batch["teacher"].to(self.device, non_blocking=True)
        student_in = batch["student"].to(self.device, non_blocking=True)
        B, V = student_in.shape[:2]
        teacher_features = None
        with self.autocast:
            with torch.no_grad():
                if teacher_in.dim() == 5:  # several teacher views (multi-crop): [B, G, K] out
                    teacher_out = self.teacher(teacher_in.flatten(0, 1)).view(B, teacher_in.shape[1], -1)
                elif self.teacher_views == "all":
                    # the teacher scores every student view (children and the parent view, the last),
                    # and each view learns from every other's: parent -> children and back
                    teacher_features, teacher_out = self.teacher(student_in.flatten(0, 1), return_features=True)
                    teacher_out = teacher_out.view(B, V, -1)
                    teacher_features = teacher_features.view(B, V, -1)[:, -1]
                else:
                    teacher_features, teacher_out = self.teacher(teacher_in, return_features=True)
            features, student_out = self.student(student_in.flatten(0, 1), return_features=True)
        student_out = student_out.float().view(B, V, -1)
        loss = self.loss(student_out, teacher_out.float(), step)
        total_loss = loss
        if self.koleo_weight > 0:
            f = features.float().view(B, V, -1)
            total_loss = total_loss + self.koleo_weight * sum(koleo_loss(f[:, v]) for v in range(V)) / V
        offset = torch.full((), float("nan"))
        if teacher_features is not None:
            offset_sq = batch_offset(teacher_features, features.view(B, V, -1)[:, :V - int(self.parent_view)])
            offset = offset_sq.detach().sqrt()
            if self.moment_weight > 0:
                total_loss = total_loss + self.moment_weight * offset_sq
        self.optimizer.zero_grad(set_to_none=True)
        total_loss.backward()
        if self.clip > 0:
            torch.nn.utils.clip_grad_norm_(self.model.student.parameters(), self.clip)
        if step < self.freeze_last_layer_steps:
            for p in self.last_layer:
                p.grad = None
        self.optimizer.step()
        self.model.update_teacher(float(self.momentum[step]))
        return self._statistics(total_loss, offset, step)

    def _statistics(self, total_loss: torch.Tensor, offset: torch.Tensor, step: int) -> dict:
        """Loss, teacher entropy, KL and the batch's magnification offset (averaged over ranks),
        prototypes used (global batch)."""
        stats = self.loss.last_stats
        vec = torch.stack([total_loss.detach().float(), stats["teacher_entropy"].float(),
                           stats["kl_teacher_student"].float(), offset.float().to(total_loss.device)])
        vec = all_reduce_mean(vec, self.world).cpu()
        counts = all_reduce_sum(torch.bincount(stats["teacher_argmax"], minlength=self.n_prototypes).float(),
                                self.world)
        return {"loss": float(vec[0]), "momentum": float(self.momentum[step]),
                "teacher_temp": float(self.loss.teacher_temp(step)), "teacher_entropy": float(vec[1]),
                "kl_teacher_student": float(vec[2]), "prototypes_used": int((counts > 0).sum()),
                "mag_offset": float(vec[3])}

    def collapse_reason(self, stats: dict) -> str | None:
        """Why this step looks collapsed (uniform teacher, or one prototype), or None."""
        reasons = []
        ln_k = math.log(self.n_prototypes)
        if stats["teacher_entropy"] >= 0.95 * ln_k:
            reasons.append(f"teacher entropy {stats['teacher_entropy']:.3f} within 5% of ln K = {ln_k:.3f} "
                           f"(uniform teacher)")
        if stats["prototypes_used"] < self.min_prototypes:
            reasons.append(f"only {stats['prototypes_used']} prototype(s) used in the batch (one-prototype collapse)")
        return "; ".join(reasons) or None

    def progress(self, stats: dict) -> dict:
        return {"loss": f"{stats['loss']:.3f}", "H": f"{stats['teacher_entropy']:.2f}",
                "used": stats["prototypes_used"]}


class SupervisedObjective:
    """The benchmark's positive control: the same backbone, augmentation, schedule and images
    per step, trained by cross-entropy on the class labels of pure tiles through a linear
    classifier. It uses labels, so it calibrates the metrics (what an encoder that learnt the
    classes at every scale scores); it is not a competitor."""

    def __init__(self, train_cfg: dict, model_cfg: dict, index: TileIndex, img_size: int,
                 total: int, device: torch.device, world: int = 1):
        if world > 1:
            raise ValueError("the supervised control runs in one process (it is a small calibration run)")
        labels = index.df["label"] if "label" in index.df.columns else None
        self.classes = sorted(labels.dropna().astype(str).unique()) if labels is not None else []
        if not self.classes:
            raise ValueError("the supervised control needs labelled tiles; the tile tables have no labels")
        codes = labels.astype("string").map({c: n for n, c in enumerate(self.classes)})
        self.codes = torch.tensor(codes.fillna(-1).to_numpy(dtype=np.int64))
        self.backbone = build_backbone(model_cfg["arch"], model_cfg.get("kwargs") or {},
                                       model_cfg.get("checkpoint"), img_size)
        self.net = torch.nn.Sequential(self.backbone,
                                       torch.nn.Linear(backbone_dim(self.backbone), len(self.classes))).to(device)
        self.optimizer = torch.optim.AdamW(param_groups(self.net), lr=float(train_cfg["lr"]), betas=(0.9, 0.999))
        self.clip = float(train_cfg.get("clip_grad") or 0.0)
        self.device = device
        self.forward = compiled(self.net, train_cfg, device)
        self.autocast = autocast_context(train_cfg, device)

    def distribute(self) -> None:
        raise ValueError("the supervised control runs in one process")

    def train_mode(self) -> None:
        self.net.train()

    def state_dict(self) -> dict:
        return {"net": self.net.state_dict(), "optimizer": self.optimizer.state_dict(), "classes": self.classes}

    def load_state_dict(self, state: dict) -> None:
        self.net.load_state_dict(state["net"])
        self.optimizer.load_state_dict(state["optimizer"])

    def load_init(self, path: str) -> None:
        state = torch.load(path, map_location="cpu", weights_only=True)
        self.backbone.load_state_dict(state["state_dict"])

    def encoder(self) -> tuple[torch.nn.Module, dict]:
        return self.backbone, {"which": "backbone", "classes": self.classes}

    def head(self) -> None:
        return None

    def step(self, batch: dict, step: int) -> dict:
        with self.autocast:
            logits = self.forward(batch["teacher"].to(self.device))
        loss = torch.nn.functional.cross_entropy(logits.float(), self.codes[batch["parents"]].to(self.device))
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if self.clip > 0:
            torch.nn.utils.clip_grad_norm_(self.net.parameters(), self.clip)
        self.optimizer.step()
        return {"loss": float(loss.detach())}

    def collapse_reason(self, stats: dict) -> str | None:
        return None

    def progress(self, stats: dict) -> dict:
        return {"loss": f"{stats['loss']:.3f}"}


OBJECTIVES = {"dino": DINOObjective, "supervised": SupervisedObjective}
