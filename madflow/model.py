"""MAD networks: timm ViT backbone, DINO head, student/teacher pair, encoder I/O.

The backbone returns the CLS token embedding (``global_pool='token'``); the head is the
DINO projection head (3-layer MLP -> bottleneck -> L2 normalisation -> weight-normalised
prototypes whose magnitude is fixed to 1). The teacher is an EMA copy of the student.
"""
from __future__ import annotations

import copy
import logging
import os
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from madflow.io import write_atomic

log = logging.getLogger(__name__)

__all__ = [
    "build_backbone",
    "DINOHead",
    "Encoder",
    "MADModel",
    "save_encoder",
    "load_encoder",
    "atomic_torch_save",
]


# ---------------------------------------------------------------------------------------
# backbone
# ---------------------------------------------------------------------------------------
def _extract_state_dict(obj: Any) -> dict:
    """Find the backbone weights in a checkpoint of one of the usual layouts."""
    if isinstance(obj, dict):
        # our own encoder file
        if "state_dict" in obj and isinstance(obj["state_dict"], dict):
            return _extract_state_dict(obj["state_dict"])
        for key in ("teacher_backbone", "teacher", "model", "module"):
            if key in obj and isinstance(obj[key], dict):
                return _extract_state_dict(obj[key])
        return obj
    if isinstance(obj, nn.Module):
        return obj.state_dict()
    raise ValueError(f"cannot find a state dict in checkpoint of type {type(obj)}")


def _strip_prefixes(sd: dict) -> dict:
    out = {}
    for k, v in sd.items():
        if not torch.is_tensor(v):
            continue
        for p in ("module.", "_orig_mod.", "backbone.", "encoder."):
            while k.startswith(p):
                k = k[len(p):]
        out[k] = v
    return out


def load_backbone_weights(model: nn.Module, checkpoint: str) -> None:
    """Load local weights into ``model`` (never downloads). Position embeddings are
    resampled to the model's grid when the checkpoint was trained at another size."""
    if not os.path.isfile(checkpoint):
        raise FileNotFoundError(f"backbone checkpoint not found: {checkpoint}")
    if checkpoint.endswith(".safetensors"):
        from safetensors.torch import load_file  # shipped with timm

        raw = load_file(checkpoint)
    else:
        try:
            raw = torch.load(checkpoint, map_location="cpu", weights_only=True)
        except Exception:  # noqa: BLE001 - older pickles with plain python objects
            raw = torch.load(checkpoint, map_location="cpu", weights_only=False)
    sd = _strip_prefixes(_extract_state_dict(raw))
    sd = {k: v for k, v in sd.items() if not k.startswith(("head.", "fc_norm.")) or k in model.state_dict()}
    try:  # timm's own filter handles pos-embed resampling, patch-embed resizing, dinov2 keys
        from timm.models.vision_transformer import VisionTransformer, checkpoint_filter_fn

        if isinstance(model, VisionTransformer):
            sd = checkpoint_filter_fn(sd, model)
    except Exception as e:  # noqa: BLE001
        log.warning("timm checkpoint filter failed (%s); loading weights as they are", e)
    missing, unexpected = model.load_state_dict(sd, strict=False)
    if missing:
        log.warning("backbone checkpoint %s: %d missing keys, e.g. %s", checkpoint, len(missing), missing[:5])
    if unexpected:
        log.warning("backbone checkpoint %s: %d unexpected keys, e.g. %s", checkpoint, len(unexpected), unexpected[:5])
    log.info("loaded backbone weights from %s", checkpoint)


def build_backbone(arch: str, kwargs: dict | None = None, checkpoint: str | None = None,
                   img_size: int = 224) -> nn.Module:
    """A timm ViT without classifier whose forward returns the CLS embedding [B, D]."""
    import timm

    kw = dict(kwargs or {})
    kw.setdefault("global_pool", "token")
    model = timm.create_model(arch, pretrained=False, num_classes=0, img_size=img_size, **kw)
    if getattr(model, "global_pool", "token") != "token":
        log.warning("backbone %s pools with %r, not the CLS token", arch, model.global_pool)
    if checkpoint:
        load_backbone_weights(model, checkpoint)
    return model


def backbone_dim(backbone: nn.Module) -> int:
    for attr in ("num_features", "embed_dim"):
        d = getattr(backbone, attr, None)
        if isinstance(d, int):
            return d
    raise ValueError("cannot infer the backbone's embedding dimension")


# ---------------------------------------------------------------------------------------
# head
# ---------------------------------------------------------------------------------------
class DINOHead(nn.Module):
    """MLP (3 layers, GELU) -> bottleneck -> L2 normalise -> weight-normalised prototypes."""

    def __init__(self, in_dim: int, hidden_dim: int = 2048, bottleneck_dim: int = 256,
                 n_prototypes: int = 65536, use_bn: bool = False):
        super().__init__()
        # use_bn (DINO's option): batch-normalised hidden layers spread the outputs of a
        # freshly initialised ViT, whose CLS tokens barely differ between tiles; without it a
        # small-batch run starts with every tile on one prototype and collapses to uniform
        norm = (lambda: nn.BatchNorm1d(hidden_dim)) if use_bn else nn.Identity
        self.mlp = nn.Sequential(
            nn.Linear(in_dim, hidden_dim),
            norm(),
            nn.GELU(),
            nn.Linear(hidden_dim, hidden_dim),
            norm(),
            nn.GELU(),
            nn.Linear(hidden_dim, bottleneck_dim),
        )
        self.apply(self._init_weights)
        last = nn.Linear(bottleneck_dim, n_prototypes, bias=False)
        nn.init.trunc_normal_(last.weight, std=0.02)
        self.last_layer = nn.utils.parametrizations.weight_norm(last)
        # magnitude fixed to 1: every prototype is a unit vector
        g = self.last_layer.parametrizations.weight.original0
        with torch.no_grad():
            g.fill_(1.0)
        g.requires_grad_(False)
        self.n_prototypes = n_prototypes

    @staticmethod
    def _init_weights(m: nn.Module) -> None:
        if isinstance(m, nn.Linear):
            nn.init.trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.mlp(x)
        eps = 1e-6 if x.dtype == torch.float32 else 1e-4
        x = F.normalize(x, dim=-1, p=2, eps=eps)
        return self.last_layer(x)


# ---------------------------------------------------------------------------------------
# student / teacher
# ---------------------------------------------------------------------------------------
class Encoder(nn.Module):
    """backbone + head; ``forward(x)`` -> prototype logits, or (features, logits)."""

    def __init__(self, backbone: nn.Module, head: nn.Module):
        super().__init__()
        self.backbone = backbone
        self.head = head

    def forward(self, x: torch.Tensor, return_features: bool = False):
        f = self.backbone(x)
        z = self.head(f)
        return (f, z) if return_features else z


class MADModel(nn.Module):
    """Student (trained) and teacher (EMA of the student, never receives gradients)."""

    def __init__(self, backbone: nn.Module, head: nn.Module):
        super().__init__()
        self.student = Encoder(backbone, head)
        self.teacher = copy.deepcopy(self.student)
        for p in self.teacher.parameters():
            p.requires_grad_(False)

    @classmethod
    def from_config(cls, model_cfg: dict, img_size: int) -> "MADModel":
        bb = build_backbone(model_cfg["arch"], model_cfg.get("kwargs") or {},
                            model_cfg.get("checkpoint"), img_size)
        h = model_cfg.get("head") or {}
        head = DINOHead(backbone_dim(bb), int(h.get("hidden_dim", 2048)),
                        int(h.get("bottleneck_dim", 256)), int(h.get("n_prototypes", 65536)),
                        use_bn=bool(h.get("use_bn", False)))
        return cls(bb, head)

    @torch.no_grad()
    def update_teacher(self, momentum: float) -> None:
        """teacher <- momentum * teacher + (1 - momentum) * student (parameters only)."""
        s_params = list(self.student.parameters())
        t_params = list(self.teacher.parameters())
        assert len(s_params) == len(t_params)
        if hasattr(torch, "_foreach_mul_"):
            torch._foreach_mul_(t_params, momentum)
            torch._foreach_add_(t_params, [p.detach() for p in s_params], alpha=1.0 - momentum)
        else:  # pragma: no cover
            for ps, pt in zip(s_params, t_params):
                pt.mul_(momentum).add_(ps.detach(), alpha=1.0 - momentum)


# ---------------------------------------------------------------------------------------
# encoder file for the embed step
# ---------------------------------------------------------------------------------------
def atomic_torch_save(obj: Any, path: str) -> None:
    """torch.save, atomically (madflow.io.write_atomic)."""
    write_atomic(path, lambda tmp: torch.save(obj, tmp))


def save_encoder(path: str, backbone: nn.Module | None, meta: dict, head: nn.Module | None = None) -> None:
    """Write ``{'meta': meta, 'state_dict': backbone weights}`` atomically.

    ``meta`` must hold plain python values and, for a network, ``arch``, ``kwargs`` and
    ``img_size`` so that :func:`load_encoder` can rebuild it. ``backbone=None`` writes a
    meta-only file (used by the ``color_stats`` experiment, which has no network). ``head``:
    the DINO head too, for a later stage that starts from this encoder (train ``init``).
    """
    if backbone is not None:
        for key in ("arch", "kwargs", "img_size"):
            if key not in meta:
                raise ValueError(f"encoder meta lacks {key!r}")
        if hasattr(backbone, "module"):  # DDP
            backbone = backbone.module
        sd = {k: v.detach().cpu().clone() for k, v in backbone.state_dict().items()}
    else:
        sd = None
    obj = {"format": "madflow-encoder-v1", "meta": dict(meta), "state_dict": sd}
    if head is not None:
        obj["head_state_dict"] = {k: v.detach().cpu().clone() for k, v in head.state_dict().items()}
    atomic_torch_save(obj, path)


def load_encoder(path: str, map_location: str | torch.device = "cpu"):
    """-> (backbone in eval mode, meta); backbone is None for a meta-only file."""
    obj = torch.load(path, map_location=map_location, weights_only=True)
    meta = obj["meta"]
    if obj.get("state_dict") is None:
        return None, meta
    bb = build_backbone(meta["arch"], meta.get("kwargs") or {}, None, int(meta["img_size"]))
    bb.load_state_dict(obj["state_dict"], strict=True)
    bb.eval()
    return bb, meta
