"""Model and loss: DINO head, CLS backbone, encoder I/O, DINO loss math, centring, EMA, KoLeo."""
import math
import os

import numpy as np
import pytest
import torch

from madflow.loss import DINOLoss, koleo_loss, teacher_temp_schedule
from madflow.model import (DINOHead, MADModel, build_backbone, load_encoder, save_encoder)

ARCH = "vit_small_patch16_224"
KW = {"patch_size": 8, "embed_dim": 64, "depth": 2, "num_heads": 2, "reg_tokens": 4}
T = 32


def _tiny_model(seed=0):
    torch.manual_seed(seed)
    return MADModel.from_config({"arch": ARCH, "kwargs": KW,
                                 "head": {"hidden_dim": 64, "bottleneck_dim": 32, "n_prototypes": 16}}, T)


# ----------------------------------------------------------------------------- backbone
def test_backbone_returns_cls_token():
    torch.manual_seed(0)
    bb = build_backbone(ARCH, KW, None, T).eval()
    x = torch.randn(3, 3, T, T)
    with torch.no_grad():
        out = bb(x)
        tokens = bb.forward_features(x)  # [B, 1 + 4 registers + patches, D], normed
    assert out.shape == (3, 64)
    assert tokens.shape[1] == 1 + 4 + (T // 8) ** 2
    torch.testing.assert_close(out, tokens[:, 0])
    assert bb.global_pool == "token"


def test_backbone_local_checkpoint(tmp_path):
    torch.manual_seed(1)
    src = build_backbone(ARCH, KW, None, T)
    p = tmp_path / "w.pt"
    torch.save({"model": {"module." + k: v for k, v in src.state_dict().items()}}, p)
    torch.manual_seed(2)
    dst = build_backbone(ARCH, KW, str(p), T)
    for (k, a), (_, b) in zip(src.state_dict().items(), dst.state_dict().items()):
        assert torch.equal(a, b), k
    with pytest.raises(FileNotFoundError):
        build_backbone(ARCH, KW, str(tmp_path / "missing.pt"), T)


def test_backbone_checkpoint_other_img_size(tmp_path):
    """pos-embed resampled when a checkpoint was trained at another tile size."""
    src = build_backbone(ARCH, KW, None, 64)
    p = tmp_path / "w.pt"
    torch.save(src.state_dict(), p)
    dst = build_backbone(ARCH, KW, str(p), T)
    assert dst.pos_embed.shape[1] == 1 + 4 + (T // 8) ** 2
    torch.testing.assert_close(dst.blocks[0].attn.qkv.weight, src.blocks[0].attn.qkv.weight)


# ----------------------------------------------------------------------------- head
def test_dino_head_prototypes_unit_norm_fixed_magnitude():
    torch.manual_seed(0)
    h = DINOHead(64, 48, 16, 10)
    wn = h.last_layer.parametrizations.weight
    assert not wn.original0.requires_grad and torch.all(wn.original0 == 1)
    with torch.no_grad():
        wn.original1.mul_(7.0)  # magnitude of v must not matter
    torch.testing.assert_close(h.last_layer.weight.norm(dim=1), torch.ones(10))
    x = torch.randn(5, 64)
    out = h(x)
    assert out.shape == (5, 10)
    # logits are cosines between a unit bottleneck vector and unit prototypes
    assert out.abs().max() <= 1.0 + 1e-5
    n_linear = sum(isinstance(m, torch.nn.Linear) for m in h.mlp)
    n_gelu = sum(isinstance(m, torch.nn.GELU) for m in h.mlp)
    assert (n_linear, n_gelu) == (3, 2)


def test_ema_update():
    m = _tiny_model()
    with torch.no_grad():
        for p in m.student.parameters():
            p.fill_(1.0)
        for p in m.teacher.parameters():
            p.fill_(3.0)
    m.update_teacher(0.9)
    for p in m.teacher.parameters():
        torch.testing.assert_close(p, torch.full_like(p, 0.9 * 3.0 + 0.1 * 1.0))
    assert not any(p.requires_grad for p in m.teacher.parameters())


def test_teacher_starts_as_copy_and_is_independent():
    m = _tiny_model()
    for a, b in zip(m.student.parameters(), m.teacher.parameters()):
        assert torch.equal(a, b) and a.data_ptr() != b.data_ptr()


# ----------------------------------------------------------------------------- encoder I/O
def test_save_load_encoder_roundtrip(tmp_path):
    m = _tiny_model()
    meta = {"arch": ARCH, "kwargs": KW, "img_size": T, "experiment": "mad"}
    path = tmp_path / "sub" / "encoder.pt"
    save_encoder(str(path), m.teacher.backbone, meta)
    assert os.listdir(path.parent) == ["encoder.pt"]  # no temp file left behind
    bb, meta2 = load_encoder(str(path))
    assert meta2["experiment"] == "mad" and meta2["img_size"] == T
    x = torch.randn(2, 3, T, T)
    m.teacher.backbone.eval()
    with torch.no_grad():
        torch.testing.assert_close(bb(x), m.teacher.backbone(x))
    # meta-only file (colour statistics have no network)
    save_encoder(str(tmp_path / "c.pt"), None, {"mode": "color_stats"})
    bb, meta3 = load_encoder(str(tmp_path / "c.pt"))
    assert bb is None and meta3["mode"] == "color_stats"
    with pytest.raises(ValueError):
        save_encoder(str(tmp_path / "bad.pt"), m.teacher.backbone, {"arch": ARCH})


# ----------------------------------------------------------------------------- loss
def _log_softmax(v):
    mx = max(v)
    lse = mx + math.log(sum(math.exp(a - mx) for a in v))
    return [a - lse for a in v]


def _softmax(v):
    return [math.exp(a) for a in _log_softmax(v)]


def test_dino_loss_hand_computed():
    tau_t, tau_s = 0.5, 0.25
    t = [[1.0, 0.0, -1.0], [0.2, 0.4, 0.0]]
    s = [[[0.0, 0.0, 0.0], [1.0, -0.5, 0.3]],
         [[0.3, 0.1, 0.2], [-1.0, 2.0, 0.0]]]
    loss_fn = DINOLoss(3, student_temp=tau_s, teacher_temp_schedule=tau_t, center_momentum=0.9)
    loss = loss_fn(torch.tensor(s), torch.tensor(t), step=0)
    # by hand: centre is 0 at first; mean over batch and children of CE(teacher, student)
    total = 0.0
    for b in range(2):
        q = _softmax([a / tau_t for a in t[b]])
        for v in range(2):
            ls = _log_softmax([a / tau_s for a in s[b][v]])
            total += -sum(qi * li for qi, li in zip(q, ls))
    expected = total / 4
    assert abs(loss.item() - expected) < 1e-5
    # entropy and KL statistics
    ent = sum(-sum(qi * math.log(qi) for qi in _softmax([a / tau_t for a in t[b]])) for b in range(2)) / 2
    assert abs(loss_fn.last_stats["teacher_entropy"].item() - ent) < 1e-5
    assert abs(loss_fn.last_stats["kl_teacher_student"].item() - (expected - ent)) < 1e-5
    assert loss_fn.last_stats["teacher_argmax"].tolist() == [0, 1]


def test_dino_loss_centre_update_and_centring():
    loss_fn = DINOLoss(3, student_temp=1.0, teacher_temp_schedule=[1.0, 2.0], center_momentum=0.9)
    t1 = torch.tensor([[1.0, 0.0, 2.0], [3.0, 0.0, 0.0]])
    s = torch.zeros(2, 1, 3)
    loss_fn(s, t1, step=0)
    c1 = 0.1 * torch.tensor([2.0, 0.0, 1.0])
    torch.testing.assert_close(loss_fn.center, c1.view(1, 3))
    # second step: teacher is centred with c1 and sharpened with the step-1 temperature 2.0
    t2 = torch.tensor([[0.5, 1.0, 0.0], [0.0, 0.0, 1.0]])
    q = loss_fn.teacher_probs(t2, step=1)
    for b in range(2):
        ref = _softmax([(t2[b, k].item() - c1[k].item()) / 2.0 for k in range(3)])
        assert np.allclose(q[b].numpy(), ref, atol=1e-6)
    loss = loss_fn(s, t2, step=1)
    assert abs(loss.item() - math.log(3)) < 1e-5  # uniform student: CE = ln K
    c2 = 0.9 * c1 + 0.1 * t2.mean(0)
    torch.testing.assert_close(loss_fn.center, c2.view(1, 3))
    # eval mode (or update_center=False) leaves the centre alone
    loss_fn.eval()
    loss_fn(s, t2, step=1)
    torch.testing.assert_close(loss_fn.center, c2.view(1, 3))


def test_dino_loss_gradient_only_to_student():
    loss_fn = DINOLoss(4, 0.1, 0.04, 0.9)
    s = torch.randn(3, 2, 4, requires_grad=True)
    t = torch.randn(3, 4, requires_grad=True)
    loss_fn(s, t, 0).backward()
    assert s.grad is not None and t.grad is None


def test_teacher_temp_schedule():
    s = teacher_temp_schedule(0.02, 0.03, 3, 6)
    assert np.allclose(s, [0.02, 0.025, 0.03, 0.03, 0.03, 0.03])
    loss_fn = DINOLoss(2, 0.1, s, 0.9)
    assert loss_fn.teacher_temp(1) == pytest.approx(0.025)
    assert loss_fn.teacher_temp(100) == pytest.approx(0.03)


def test_koleo_hand_computed():
    x = torch.tensor([[2.0, 0.0], [0.0, 3.0], [1.0, 0.1]])
    u = [np.array(r) / np.linalg.norm(r) for r in x.tolist()]
    # nearest neighbours by cosine: 0 -> 2, 1 -> 2, 2 -> 0
    d = [np.linalg.norm(u[0] - u[2]), np.linalg.norm(u[1] - u[2]), np.linalg.norm(u[2] - u[0])]
    expected = -np.mean(np.log(np.array(d)))
    assert abs(koleo_loss(x).item() - expected) < 1e-4
    assert koleo_loss(torch.randn(1, 5)).item() == 0.0


def test_sinkhorn_teacher_balances_prototypes():
    torch.manual_seed(0)
    loss_fn = DINOLoss(6, 0.1, 0.05, 0.9, centering="sinkhorn", sinkhorn_iterations=50)
    t = torch.randn(12, 6) * 0.1 + torch.tensor([3.0, 0, 0, 0, 0, 0])  # one dominant prototype
    q = loss_fn.teacher_probs(t, 0)
    torch.testing.assert_close(q.sum(1), torch.ones(12))
    torch.testing.assert_close(q.sum(0), torch.full((6,), 2.0), atol=1e-3, rtol=0)
    ema = DINOLoss(6, 0.1, 0.05, 0.9).teacher_probs(t, 0)
    assert (ema.argmax(1) == 0).all() and len(set(q.argmax(1).tolist())) > 1
    loss_fn(torch.zeros(12, 2, 6), t, 0)
    assert torch.all(loss_fn.center == 0)  # no EMA centre in sinkhorn mode
