"""Does a trained run do what its objective asks? For the test slides' pure 10x tiles (150 per
slide) and 4 of their 40x children each, compare the teacher's prototype for the 10x parent
with the student's prototype for each 40x child (eval mode, tile colour standardisation as in
training when the run used it), against a random 10x parent of the same slide.

    python studies/prototype_agreement.py results/studies/NAME/checkpoints/last.pt

Prints AMI(class, argmax) at each side and the child-parent argmax agreement (docs/results.md, "Findings")."""
import sys

import numpy as np
import pandas as pd
import torch
from sklearn.metrics import adjusted_mutual_info_score

from madflow.data.augment import pixels_to_input
from madflow.manifest import read_checked_manifest
from madflow.model import MADModel
from madflow.slides import SlideReader

torch.set_grad_enabled(False)
ck = torch.load(sys.argv[1], map_location="cpu", weights_only=False)
tile_px = 64
model = MADModel.from_config(ck["model_config"], tile_px)
model.teacher.load_state_dict(ck["teacher"])
model.student.load_state_dict(ck["student"])
model.teacher.eval()
model.student.eval()
tile_norm = bool(ck["train_config"].get("tile_norm", False))


def prototypes(reader, rows, net):
    x = pixels_to_input(reader.read_tiles(rows), tile_norm)
    return torch.cat([net(x[i:i + 256]) for i in range(0, len(x), 256)]).argmax(1).numpy()


split = read_checked_manifest("results/manifest.tsv")
rng = np.random.default_rng(0)
parents, children, agree, agree_random = [], [], [], []
for sid in split[split.split == "test"].slide_id:
    g = pd.read_parquet(f"results/tiles/{sid}.parquet")
    g = g[g.tissue]
    p = g[(g.mag == 10) & (g.label_purity >= 0.8)].sample(150, random_state=0).reset_index(drop=True)
    c = g[g.mag == 40].merge(p[["i", "j", "k"]].assign(parent=np.arange(len(p))), on=["i", "j", "k"])
    c = c.groupby("parent").head(4)
    reader = SlideReader(g.path.iloc[0])
    tp, sc = prototypes(reader, p, model.teacher), prototypes(reader, c, model.student)
    parents.append(pd.DataFrame({"label": p.label.astype(str), "proto": tp}))
    children.append(pd.DataFrame({"label": p.label.astype(str).values[c.parent], "proto": sc}))
    agree.append(tp[c.parent.values] == sc)
    agree_random.append(tp[rng.integers(len(p), size=len(c))] == sc)
P, C = pd.concat(parents), pd.concat(children)
print(f"AMI(class, teacher prototype of 10x parent) {adjusted_mutual_info_score(P.label, P.proto):.3f} "
      f"({P.proto.nunique()} prototypes used)")
print(f"AMI(class, student prototype of 40x child) {adjusted_mutual_info_score(C.label, C.proto):.3f}")
print(f"child prototype == its parent's: {np.concatenate(agree).mean():.3f}; "
      f"== a random parent's of the same slide: {np.concatenate(agree_random).mean():.3f}")
