"""Where does a trained run's cross-scale transfer live? A 10x->40x probe (StandardScaler +
logistic regression, trained on the train slides' pure 10x tiles, tested on the test slides'
pure 40x tiles; 15% of 40x tiles) on three embeddings of the teacher: the CLS token (what docs/metrics.md
evaluates), the head's bottleneck, and the prototype logits; each also with every magnification's
features standardised on their own (a named variant, never the metric of docs/metrics.md).
The head's batch norm runs on its running statistics, except in two reads of what the head
makes of the backbone's output as trained: (a) the head with batch statistics, each
magnification's tiles in a batch of their own (as the teacher's parent batches and, mostly,
the student's child batches were in training; the batch holds train and test slides' tiles, so
its statistics, not its labels, see the test slides); (b) the head fed CLS tokens whose 40x mean was
moved onto the 10x mean (the offset measured on the train slides).

    python studies/head_probe.py results/studies/NAME/checkpoints/last.pt"""
import copy
import sys

import numpy as np
import pandas as pd
import torch
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import balanced_accuracy_score
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from madflow.data.augment import pixels_to_input
from madflow.manifest import read_checked_manifest
from madflow.model import MADModel
from madflow.slides import SlideReader

torch.set_grad_enabled(False)
ck = torch.load(sys.argv[1], map_location="cpu", weights_only=False)
model = MADModel.from_config(ck["model_config"], 64)
model.teacher.load_state_dict(ck["teacher"])
teacher = model.teacher.eval()
tile_norm = bool(ck["train_config"].get("tile_norm", False))
split = read_checked_manifest("results/manifest.tsv")
rng = np.random.default_rng(0)
cls, meta = [], []
for sid, part in zip(split.slide_id, split.split):
    g = pd.read_parquet(f"results/tiles/{sid}.parquet")
    g = g[g.tissue & (g.label_purity >= 0.8) & g.mag.isin([10, 40])]
    g = g[(g.mag == 10) | (rng.random(len(g)) < 0.15)].reset_index(drop=True)
    x = pixels_to_input(SlideReader(g.path.iloc[0]).read_tiles(g), tile_norm)
    cls += [teacher.backbone(x[i:i + 512]) for i in range(0, len(x), 512)]
    meta.append(g[["mag", "label"]].assign(split=part))
cls = torch.cat(cls)
meta = pd.concat(meta, ignore_index=True)
train = ((meta.mag == 10) & (meta.split == "train")).to_numpy()
test = ((meta.mag == 40) & (meta.split == "test")).to_numpy()
y = meta.label.astype(str).to_numpy()
at = {m: torch.tensor((meta.mag == m).to_numpy()) for m in (10, 40)}


def batch_stats_head(f: torch.Tensor, module) -> torch.Tensor:
    """``module`` (part of the head) with batch statistics, each magnification a batch."""
    net = copy.deepcopy(module).train()
    out = torch.empty(len(f), net(f[:2]).shape[1])
    for sel in at.values():
        out[sel] = net(f[sel])
    return out


train_40 = torch.tensor(((meta.mag == 40) & (meta.split == "train")).to_numpy())
offset = cls[train_40].mean(0) - cls[torch.tensor(train)].mean(0)
moved = torch.where(at[40][:, None], cls - offset, cls)
w1 = teacher.head.mlp[0].weight


def gain(v: torch.Tensor) -> float:
    """How strongly the head's first layer reads direction v: |W1 v| / |v|."""
    return float((w1 @ v).norm() / v.norm())


labels_10 = sorted(set(y[train]))
means_10 = [cls[torch.tensor(train & (y == c))].mean(0) for c in labels_10]
class_diffs = [a - b for i, a in enumerate(means_10) for b in means_10[i + 1:]]
random_dirs = torch.randn(50, cls.shape[1], generator=torch.Generator().manual_seed(0))
print(f"offset |40x mean - 10x mean| {offset.norm():.2f}; mean distance between 10x class means "
      f"{np.mean([float(d.norm()) for d in class_diffs]):.2f}; first head layer gain along the offset "
      f"{gain(offset):.2f}, along 10x class-mean differences {np.mean([gain(d) for d in class_diffs]):.2f}, "
      f"along random directions {np.mean([gain(d) for d in random_dirs]):.2f}")
feats = {"CLS token": cls, "head bottleneck": teacher.head.mlp(cls), "prototype logits": teacher.head(cls),
         "prototype logits, BN on each magnification's batch": batch_stats_head(cls, teacher.head),
         "prototype logits of the offset-moved CLS": teacher.head(moved)}


def probe(X):
    clf = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000)).fit(X[train], y[train])
    return balanced_accuracy_score(y[test], clf.predict(X[test]))


for name, v in feats.items():
    X = v.numpy().copy()
    X /= np.linalg.norm(X, axis=1, keepdims=True)
    per_mag = X.copy()
    for m in (10, 40):
        sel = (meta.mag == m).to_numpy()
        per_mag[sel] = (X[sel] - X[sel].mean(0)) / (X[sel].std(0) + 1e-6)
    print(f"{name}: BA 10->40 {probe(X):.3f}; per-magnification standardised {probe(per_mag):.3f}")
