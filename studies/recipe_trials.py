"""Recipe trials behind the README's "Findings": train one variant on the demo's train
slides and evaluate it on a subsample (all 2.5x/10x tissue tiles, 25% of 40x tiles).

    snakemake --cores 2 tiles        # the demo's tile tables and manifest in results/
    python studies/recipe_trials.py NAME ['{"mode": "random_init"}'] [train.k=v] [kw.k=v] [head.k=v]

kw.* are timm model kwargs, head.* DINO-head settings, train.* training settings. One JSON line
per trial is appended to studies/recipe_trials.jsonl (the table in the README).

``{"mode": "supervised"}`` is the workflow's positive control (madflow.train, labels of pure tiles
at the pairs' magnifications, drawn by the pair weights, MAD's schedule). The trial-only
``{"mode": "supervised_uniform", "mags": [10, 40], "cosine": true}`` is the first version of it:
tiles of those magnifications drawn uniformly (so mostly the finest), constant lr, optional
cosine classifier. Both use labels: they calibrate the benchmark and are not competitors."""
import sys, json, yaml, glob, time, logging, numpy as np, pandas as pd
from pathlib import Path
from madflow.train import train
from madflow.embed import build_encoder, l2_normalise
from madflow.slides import SlideReader
from madflow.metrics import evaluate
name = sys.argv[1]; exp = json.loads(sys.argv[2]) if len(sys.argv) > 2 and sys.argv[2].startswith('{') else {}
REPO = Path(__file__).resolve().parents[1]
cfg = yaml.safe_load(open(REPO / 'config.yaml'))
for kv in sys.argv[2:]:
    if kv.startswith('{'): continue
    k, v = kv.split('=', 1); sec, key = k.split('.', 1)
    if sec == 'kw': cfg['model']['kwargs'][key] = yaml.safe_load(v)
    elif sec == 'head': cfg['model']['head'][key] = yaml.safe_load(v)
    else: cfg[sec][key] = yaml.safe_load(v)
split = pd.read_csv('results/manifest.tsv', sep='\t')[['slide_id', 'split']]
train_ids = split[split.split=='train'].slide_id
tables = [f'results/tiles/{s}.parquet' for s in train_ids]
out = f'results/studies/{name}'
t0 = time.time()
logging.basicConfig(level=logging.WARNING)
mode = exp.get('mode', 'mad')

def train_supervised_uniform(cfg, mags, tables, out, cosine=False):
    """Labels of pure tiles at `mags` -> the backbone, through a linear classifier; cosine: a
    cosine classifier (unit features and class vectors, temperature 0.1), which pulls every
    tile of a class towards one direction whatever its magnification."""
    import torch
    from madflow.data import Augmenter
    from madflow.model import build_backbone, backbone_dim, save_encoder
    from madflow.train_config import TRAIN_DEFAULTS
    torch.manual_seed(0)
    tcfg = {**TRAIN_DEFAULTS, **cfg['train']}
    m = cfg['model']
    tiles = pd.concat([pd.read_parquet(t) for t in tables], ignore_index=True)
    tiles = tiles[tiles.tissue & tiles.mag.isin(mags) & (tiles.label_purity >= cfg['tiling']['min_purity'])]
    classes = sorted(tiles.label.astype(str).unique())
    px, ys = [], []
    for path, g in tiles.groupby('path'):
        px.append(SlideReader(path).read_tiles(g)); ys.append(g.label.astype(str).map(classes.index).to_numpy())
    px, ys = np.concatenate(px), np.concatenate(ys)
    bb = build_backbone(m['arch'], m['kwargs'], None, cfg['tiling']['tile_px'])
    fc = torch.nn.Linear(backbone_dim(bb), len(classes), bias=not cosine)
    def net(x):
        f = bb(x)
        if cosine:
            return torch.nn.functional.normalize(f, dim=1) @ torch.nn.functional.normalize(fc.weight, dim=1).T / 0.1
        return fc(f)
    opt = torch.optim.AdamW([*bb.parameters(), *fc.parameters()], lr=float(tcfg['lr']), weight_decay=0.05)
    aug = Augmenter(hed_jitter=float(tcfg['hed_jitter']), color_jitter=float(tcfg['color_jitter']),
                    blur_prob=float(tcfg['blur_prob']), tile_norm=bool(tcfg['tile_norm']))
    rng = np.random.default_rng(0)
    n = int(tcfg['batch_parents']) * (int(tcfg['n_local']) + 1)  # as many images per step as MAD
    for step in range(int(tcfg['steps'])):
        b = rng.choice(len(ys), n)
        x = aug(torch.from_numpy(px[b]).permute(0, 3, 1, 2).float().div_(255), rng)
        loss = torch.nn.functional.cross_entropy(net(x), torch.from_numpy(ys[b]))
        opt.zero_grad(); loss.backward(); opt.step()
    Path(out).mkdir(parents=True, exist_ok=True)
    save_encoder(f'{out}/encoder.pt', bb, {'arch': m['arch'], 'kwargs': m['kwargs'], 'img_size': cfg['tiling']['tile_px'],
                                           'mode': 'supervised_uniform', 'seed': 0, 'tile_norm': bool(tcfg['tile_norm'])})


if mode == 'supervised_uniform':
    train_supervised_uniform(cfg, [float(x) for x in exp['mags']], tables, out, bool(exp.get('cosine')))
elif mode != 'color_stats':
    train(cfg, exp, tables, out, 0, device='cpu', experiment_name=name)
ttrain = time.time() - t0
enc, _ = build_encoder(exp, f'{out}/encoder.pt', 64)
# evaluation subsample: all 2.5x/10x tissue tiles, 40x tiles of 1 in 4 10x parents... keep all purity>=0.8 40x of a random 25%
rng = np.random.default_rng(0)
frames, xs = [], []
for sid, sp in zip(split.slide_id, split.split):
    g = pd.read_parquet(f'results/tiles/{sid}.parquet'); g = g[g.tissue]
    keep = (g.mag < 40) | (rng.random(len(g)) < 0.25)
    g = g[keep].reset_index(drop=True)
    r = SlideReader(g.path.iloc[0])
    X = np.concatenate([enc(r.read_tiles(g.iloc[i:i+512])) for i in range(0, len(g), 512)])
    g['split'] = sp; frames.append(g); xs.append(l2_normalise(X))
tiles = pd.concat(frames, ignore_index=True); X = np.concatenate(xs)
m, art = evaluate(tiles, X, magnifications=[2.5,10,40], n_bootstrap=50, cv_folds=3)
def v(metric, scope): return float(m[(m.metric==metric)&(m.scope==scope)].value.iloc[0])
log = pd.read_csv(f'{out}/train_log.tsv', sep='\t') if mode not in ('color_stats', 'supervised', 'supervised_uniform') and glob.glob(f'{out}/train_log.tsv') else None
res = dict(name=name, ttrain=round(ttrain), BA10_10=v('probe_ba','10->10'), BA10_40=v('probe_ba','10->40'), BA40_40=v('probe_ba','40->40'),
           BA25_25=v('probe_ba','2.5->2.5'), BA25_10=v('probe_ba','2.5->10'), BA40_10=v('probe_ba','40->10'), Rcc10_40=v('retention_cc','10->40'),
           AMI=v('ami','global'), leak=v('mag_leakage','global'), dh10_40=v('delta_hier','10->40'), dh25_10=v('delta_hier','2.5->10'),
           ent=None if log is None or not len(log) else round(float(log.teacher_entropy.tail(10).mean()),2),
           protos=None if log is None or not len(log) else float(log.prototypes_used.tail(10).mean()))
print(json.dumps({k: (round(x,3) if isinstance(x,float) else x) for k,x in res.items()}))
open(REPO / 'studies' / 'recipe_trials.jsonl', 'a').write(json.dumps(res)+'\n')
