"""Where does a trained run's cross-scale transfer live? A 10x->40x probe (StandardScaler +
logistic regression, trained on the train slides' pure 10x tiles, tested on the test slides'
pure 40x tiles; 15% of 40x tiles) on three embeddings of the teacher: the CLS token (what docs/metrics.md
evaluates), the head's bottleneck, and the prototype logits; each also with every magnification's
features standardised on their own (a named variant, never the metric of docs/metrics.md).

    python studies/head_probe.py results/studies/NAME/checkpoints/last.pt"""
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
feats = {"CLS token": [], "head bottleneck": [], "prototype logits": []}
meta = []
for sid, part in zip(split.slide_id, split.split):
    g = pd.read_parquet(f"results/tiles/{sid}.parquet")
    g = g[g.tissue & (g.label_purity >= 0.8) & g.mag.isin([10, 40])]
    g = g[(g.mag == 10) | (rng.random(len(g)) < 0.15)].reset_index(drop=True)
    x = pixels_to_input(SlideReader(g.path.iloc[0]).read_tiles(g), tile_norm)
    for i in range(0, len(x), 512):
        f = teacher.backbone(x[i:i + 512])
        for name, v in zip(feats, (f, teacher.head.mlp(f), teacher.head(f))):
            feats[name].append(v.numpy())
    meta.append(g[["mag", "label"]].assign(split=part))
meta = pd.concat(meta, ignore_index=True)
train = ((meta.mag == 10) & (meta.split == "train")).to_numpy()
test = ((meta.mag == 40) & (meta.split == "test")).to_numpy()
y = meta.label.astype(str).to_numpy()


def probe(X):
    clf = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000)).fit(X[train], y[train])
    return balanced_accuracy_score(y[test], clf.predict(X[test]))


for name, v in feats.items():
    X = np.concatenate(v)
    X /= np.linalg.norm(X, axis=1, keepdims=True)
    per_mag = X.copy()
    for m in (10, 40):
        sel = (meta.mag == m).to_numpy()
        per_mag[sel] = (X[sel] - X[sel].mean(0)) / (X[sel].std(0) + 1e-6)
    print(f"{name}: BA 10->40 {probe(X):.3f}; per-magnification standardised {probe(per_mag):.3f}")
