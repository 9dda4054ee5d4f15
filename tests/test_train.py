"""Data sampling, augmentation and training (determinism, resume, DDP) on tiny synthetic slides.

The slides here are level-0 uint8 arrays saved as .npy plus hand-built tile tables in the
CONTRACTS.md format; a small reader implements ``read_tiles(df)`` on them by box
averaging (what a native pyramid level is), so these tests do not depend on other modules.
One integration test reads a real pyramidal TIFF with ``madflow.slides.SlideReader``.
"""
import json
import logging
import os
import subprocess
import sys
import textwrap

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F

from madflow import data as D
from madflow.model import load_encoder

T = 32
BASE = 40.0
MAGS = [2.5, 10.0, 40.0]
HERE = os.path.dirname(os.path.abspath(__file__))


# ----------------------------------------------------------------------------- fixtures
class NpyReader:
    """read_tiles(df) on a level-0 .npy image: box-average each footprint to tile_px."""

    def __init__(self, path):
        self.img = np.load(path, mmap_mode="r")

    def read_tiles(self, df):
        H, W, _ = self.img.shape
        out = np.empty((len(df), int(df["tile_px"].iloc[0]), int(df["tile_px"].iloc[0]), 3), np.uint8)
        for n, r in enumerate(df.itertuples(index=False)):
            s, t = int(r.size0), int(r.tile_px)
            crop = np.full((s, s, 3), 255, np.float64)
            y1, x1 = min(r.y0 + s, H), min(r.x0 + s, W)
            crop[: y1 - r.y0, : x1 - r.x0] = self.img[r.y0:y1, r.x0:x1]
            f = s // t
            out[n] = np.round(crop.reshape(t, f, t, f, 3).mean(axis=(1, 3))).astype(np.uint8)
        return out


def make_table(slide_id, path, width, height, tissue_fn, tile_px=T):
    """Tile table (CONTRACTS.md columns) for a 40x slide with mags 2.5/10/40."""
    rows = []
    S = tile_px * 16  # 2.5x footprint in level-0 px
    for i in range(height // S):
        for j in range(width // S):
            x0, y0 = j * S, i * S
            rows.append((2.5, i, j, None, None, x0, y0, S, 2))
            for k in range(16):
                dy, dx = divmod(k, 4)
                cx, cy = x0 + dx * S // 4, y0 + dy * S // 4
                rows.append((10.0, i, j, k, None, cx, cy, S // 4, 1))
                for m in range(16):
                    gy, gx = divmod(m, 4)
                    rows.append((40.0, i, j, k, m, cx + gx * S // 16, cy + gy * S // 16, S // 16, 0))
    df = pd.DataFrame(rows, columns=["mag", "i", "j", "k", "m", "x0", "y0", "size0", "level"])
    df.insert(0, "slide_id", slide_id)
    for c in ("i", "j"):
        df[c] = df[c].astype("int32")
    for c in ("k", "m"):
        df[c] = df[c].astype("Int32")
    df["x0"] = df["x0"].astype("int64")
    df["y0"] = df["y0"].astype("int64")
    df["size0"] = df["size0"].astype("int64")
    df["tile_px"] = np.int32(tile_px)
    df["level"] = df["level"].astype("int32")
    df["downsample"] = 4.0 ** df["level"]
    df["native"] = True
    df["tissue_frac"] = np.array([tissue_fn(x, y, s) for x, y, s in zip(df.x0, df.y0, df.size0)], np.float32)
    df["tissue"] = df["tissue_frac"] >= 0.5
    df["label"] = pd.Series([None] * len(df), dtype="string")
    df["label_purity"] = np.float32(np.nan)
    df["path"] = str(path)
    return df


def make_slides(root, n_slides=3, size=1024, seed=0):
    """n_slides random slides with a disc of tissue; returns parquet paths."""
    rng = np.random.default_rng(seed)
    paths = []
    for s in range(n_slides):
        base = rng.integers(0, 256, size=(size // 8, size // 8, 3)).astype(np.uint8)
        img = np.repeat(np.repeat(base, 8, 0), 8, 1)
        img = np.clip(img.astype(np.int16) + rng.integers(-20, 21, size=img.shape), 0, 255).astype(np.uint8)
        p = os.path.join(root, f"s{s}.npy")
        np.save(p, img)
        cx, cy, rad = size * (0.45 + 0.05 * s), size * 0.5, size * (0.42 - 0.04 * s)
        yy, xx = np.mgrid[0:size:16, 0:size:16] + 8
        mask = ((xx - cx) ** 2 + (yy - cy) ** 2) < rad ** 2  # 16-px resolution tissue mask

        def tissue_fn(x, y, sz, mask=mask):
            return float(mask[y // 16:(y + sz) // 16, x // 16:(x + sz) // 16].mean()) if sz >= 16 else \
                float(mask[y // 16, x // 16])

        df = make_table(f"slide{s}", p, size, size, tissue_fn)
        q = os.path.join(root, f"slide{s}.parquet")
        df.to_parquet(q)
        paths.append(q)
    return paths


@pytest.fixture(scope="module")
def slides(tmp_path_factory):
    root = tmp_path_factory.mktemp("slides")
    return make_slides(str(root))


@pytest.fixture(scope="module")
def index(slides):
    return D.TileIndex(D.load_tables(slides))


def tiny_cfg(steps=4, **train):
    cfg = {
        "tiling": {"tile_px": T, "magnifications": MAGS},
        "model": {"arch": "vit_small_patch16_224",
                  "kwargs": {"patch_size": 8, "embed_dim": 64, "depth": 2, "num_heads": 2, "reg_tokens": 4},
                  "checkpoint": None,
                  "head": {"hidden_dim": 64, "bottleneck_dim": 32, "n_prototypes": 64}},
        "train": {"steps": steps, "batch_parents": 8, "n_local": 4,
                  "pairs": {"2.5->10": 0.5, "10->40": 0.5}, "lr": 1e-3, "min_lr": 1e-5,
                  "warmup_frac": 0.25, "weight_decay": [0.04, 0.2], "clip_grad": 3.0,
                  "freeze_last_layer_steps": 1, "momentum": [0.99, 1.0], "teacher_temp": [0.02, 0.03],
                  "teacher_temp_warmup_frac": 0.3, "student_temp": 0.1, "center_momentum": 0.9,
                  "koleo_weight": 0.0, "parent_view": True, "checkpoint_every": 2, "num_workers": 0},
        "experiments": {"mad": {}, "same_mag": {"mode": "same_mag"}, "shuffled": {"mode": "shuffled"},
                        "interp": {"mode": "interp"}, "pair_10_40": {"pairs": {"10->40": 1.0}},
                        "tri": {"mode": "tri"}, "random_init": {"mode": "random_init"},
                        "color_stats": {"mode": "color_stats"}, "base": {"mode": "dino"},
                        "mad_from_base": {"init": "base"}},
    }
    cfg["train"].update(train)
    return cfg


def key(df, r):
    row = df.iloc[int(r)]
    return (row.slide_id, int(row.i), int(row.j),
            None if pd.isna(row.k) else int(row.k), None if pd.isna(row.m) else int(row.m))


# ----------------------------------------------------------------------------- sampling
def test_index_tissue_only_and_depths(index):
    assert index.df["tissue"].all()
    assert index.mags == MAGS
    assert index.depth == {2.5: 0, 10.0: 1, 40.0: 2}


@pytest.mark.parametrize("pair", ["2.5->10", "10->40"])
def test_mad_children_are_the_parents_children(index, pair):
    df = index.df
    a, b = D.parse_pair(pair)
    for step in range(20):
        rows = D.sample_batch(index, "mad", pair, 8, 4, np.random.default_rng(step))
        P, C = rows["parents"], rows["children"]
        assert P.shape == (8,) and C.shape == (8, 4)
        for p, cs in zip(P, C):
            pk = key(df, p)
            assert df.mag.iloc[p] == a
            assert len(set(cs.tolist())) == 4  # without replacement
            for c in cs:
                ck = key(df, c)
                assert df.mag.iloc[c] == b and bool(df.tissue.iloc[c])
                depth = index.depth[a]
                assert ck[:3 + depth] == pk[:3 + depth]  # same slide, i, j (, k)
                assert ck[3 + depth] is not None  # exactly one magnification finer
                # footprint inside the parent, 1/16 of its area
                assert df.size0.iloc[c] * 4 == df.size0.iloc[p]
                assert df.x0.iloc[p] <= df.x0.iloc[c] < df.x0.iloc[p] + df.size0.iloc[p]
                assert df.y0.iloc[p] <= df.y0.iloc[c] < df.y0.iloc[p] + df.size0.iloc[p]


@pytest.mark.parametrize("n_local", [4, 14])
def test_eligible_parents_have_enough_tissue_children(index, slides, n_local):
    full = D.load_tables(slides)
    elig, _ = index.eligible((10.0, 40.0), n_local)
    n_children = {}
    tiss = full[full.tissue & (full.mag == 40.0)]
    for (s, i, j, k), g in tiss.groupby(["slide_id", "i", "j", "k"]):
        n_children[(s, i, j, int(k))] = len(g)
    got = {key(index.df, p)[:4] for p in elig}
    want = {kk for kk, n in n_children.items() if n >= n_local}
    # parents must themselves be tissue tiles
    tissue_parents = {(r.slide_id, r.i, r.j, int(r.k)) for r in full[full.tissue & (full.mag == 10.0)].itertuples()}
    assert got == want & tissue_parents
    if n_local == 14:  # the edge of the disc has parents with few tissue children
        assert len(got) < len(tissue_parents)


def test_shuffled_children_are_unrelated(index):
    df = index.df
    for step in range(10):
        rows = D.sample_batch(index, "shuffled", "10->40", 8, 4, np.random.default_rng(step))
        for p, cs in zip(rows["parents"], rows["children"]):
            for c in cs:
                assert df.mag.iloc[c] == 40.0 and bool(df.tissue.iloc[c])
                assert df.slide_id.iloc[c] != df.slide_id.iloc[p]  # another slide


def test_shuffled_single_slide_uses_other_parent(slides):
    idx = D.TileIndex(D.load_tables(slides[:1]))
    for step in range(10):
        rows = D.sample_batch(idx, "shuffled", "2.5->10", 4, 4, np.random.default_rng(step))
        for p, cs in zip(rows["parents"], rows["children"]):
            own = set(idx.children_of(int(p), 10.0).tolist())
            assert not own & set(cs.tolist())


def test_same_mag_and_group_weights(index):
    g = D.group_weights("same_mag", {"2.5->10": 0.5, "10->40": 0.5})
    assert g == {"2.5": 0.25, "10": 0.5, "40": 0.25}
    for m in ("2.5", "10", "40"):
        rows = D.sample_batch(index, "same_mag", m, 8, 4, np.random.default_rng(0))
        assert (index.df.mag.to_numpy()[rows["parents"]] == float(m)).all()
        assert (rows["children"] == rows["parents"][:, None]).all()
    assert D.group_weights("tri", {"2.5->10": 0.5, "10->40": 0.5}) == {"2.5->10->40": 1.0}
    # pair choice follows the weights and is the same on every rank
    counts = {"2.5->10": 0, "10->40": 0}
    for s in range(400):
        counts[D.choose_group({"2.5->10": 0.5, "10->40": 0.5}, np.random.default_rng([0, s, 7919]))] += 1
    assert 150 < counts["2.5->10"] < 250
    assert D.group_weights("mad", {"10->40": 1.0}) == {"10->40": 1.0}


def test_tri_children_and_grandchildren(index):
    df = index.df
    rows = D.sample_batch(index, "tri", "2.5->10->40", 6, 4, np.random.default_rng(3))
    assert rows["children"].shape == (6, 8)
    for p, cs in zip(rows["parents"], rows["children"]):
        pk = key(df, p)
        assert df.mag.iloc[p] == 2.5
        assert (df.mag.to_numpy()[cs[:4]] == 10.0).all() and (df.mag.to_numpy()[cs[4:]] == 40.0).all()
        for c in cs:
            assert key(df, c)[:3] == pk[:3]


def test_sampling_is_a_pure_function_of_rng(index):
    a = D.sample_batch(index, "mad", "2.5->10", 8, 4, np.random.default_rng([5, 3, 0, 0]))
    b = D.sample_batch(index, "mad", "2.5->10", 8, 4, np.random.default_rng([5, 3, 0, 0]))
    assert (a["parents"] == b["parents"]).all() and (a["children"] == b["children"]).all()


# ----------------------------------------------------------------------------- pixels
def _ds(index, mode="mad", pairs=None, parent_view=True, aug=True, **kw):
    return D.MADBatchDataset(index, mode, pairs or {"2.5->10": 0.5, "10->40": 0.5}, 8, 4, seed=0,
                             total_steps=4, parent_view=parent_view, reader_factory=NpyReader,
                             augmenter=D.Augmenter(enabled=aug), **kw)


def test_interp_views_are_upsampled_parent_crops(index):
    ds = _ds(index, "interp", {"10->40": 1.0}, parent_view=False, aug=False)
    rows = D.sample_batch(index, "interp", "10->40", 8, 4, np.random.default_rng(1))
    teacher, student = ds.raw_views(rows)
    native = ds.read_rows(rows["children"])
    s = T // 4
    for b in range(8):
        for v in range(4):
            mm = int(index.df.m.iloc[rows["children"][b, v]])  # grandchild index = position in parent
            dy, dx = divmod(mm, 4)
            crop = teacher[b:b + 1, :, dy * s:(dy + 1) * s, dx * s:(dx + 1) * s]
            ref = F.interpolate(crop, size=(T, T), mode="bilinear", align_corners=False)[0]
            torch.testing.assert_close(student[b, v], ref)
            # same place as the native child: the child box-downsampled 4x is the crop
            small = F.avg_pool2d(native[b, v:v + 1], 4)
            assert (small - crop).abs().max() <= 1.0 / 255 + 1e-6
            # but no native detail: the native child differs from the interpolated view
            assert (native[b, v] - student[b, v]).abs().mean() > 0.01


def test_batch_shapes_views_and_augmentation(index):
    ds = _ds(index)
    batch = ds.batch_for_step(0)
    assert batch["teacher"].shape == (8, 3, T, T) and batch["teacher"].dtype == torch.float32
    assert batch["student"].shape == (8, 5, 3, T, T)  # 4 children + the parent view
    assert torch.isfinite(batch["student"]).all()
    # determinism of a step's batch
    again = ds.batch_for_step(0)
    assert torch.equal(batch["student"], again["student"])
    # un-augmented: normalised raw pixels; parent view is the parent
    raw = _ds(index, aug=False).batch_for_step(0)
    t, s = _ds(index, aug=False).raw_views(_ds(index, aug=False).rows_for_step(0))
    mean = torch.tensor(D.IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(D.IMAGENET_STD).view(1, 3, 1, 1)
    torch.testing.assert_close(raw["teacher"], (t - mean) / std)
    torch.testing.assert_close(raw["student"][:, -1], raw["teacher"])
    # augmentation keeps native scale: the view's pixel multiset is close to the raw tile's
    aug = D.Augmenter(hed_jitter=0.0, color_jitter=0.0, blur_prob=0.0)
    x = t[:4]
    y = aug(x, np.random.default_rng(0)) * std + mean
    for n in range(4):
        assert torch.allclose(torch.sort(y[n].flatten())[0], torch.sort(x[n].flatten())[0], atol=1e-5)


def test_same_mag_batch_views_share_the_tile(index):
    ds = _ds(index, "same_mag", aug=False)
    b = ds.batch_for_step(1)
    for v in range(b["student"].shape[1]):
        torch.testing.assert_close(b["student"][:, v], b["teacher"])


def test_same_mag_weight_mixes_plain_dino_batches(index):
    # weight 1 -> 0 over 40 steps: early steps are same-magnification batches, late ones cross-scale
    ds = _ds(index, "shuffled", aug=False, same_mag_weight=np.linspace(1.0, 0.0, 40))
    kinds = [ds.group_for_step(s) for s in range(40)]
    assert kinds[0][0] == "same_mag" and kinds[0][1] in {"2.5", "10", "40"}
    assert kinds[-1] == ("shuffled", kinds[-1][1]) and "->" in kinds[-1][1]
    assert 10 < sum(k[0] == "same_mag" for k in kinds) < 30
    assert kinds == [ds.group_for_step(s) for s in range(40)]  # a pure function of the step
    b = ds.batch_for_step(0)
    for v in range(b["student"].shape[1]):
        torch.testing.assert_close(b["student"][:, v], b["teacher"])
    # weight 0 leaves the cross-scale sampler exactly as it was
    plain, zero = _ds(index, "shuffled"), _ds(index, "shuffled", same_mag_weight=np.zeros(4))
    assert [plain.group_for_step(s) for s in range(4)] == [zero.group_for_step(s) for s in range(4)]


def test_unknown_train_settings_are_errors():
    from madflow.config import resolve_train_config

    cfg = tiny_cfg()
    assert resolve_train_config(cfg, {"same_mag_weight": [0.5, 0.1]})[1]["same_mag_weight"] == [0.5, 0.1]
    with pytest.raises(ValueError, match="teacher_tmp"):
        resolve_train_config(cfg, {"name": "typo", "teacher_tmp": 0.04})
    with pytest.raises(ValueError, match="parentview"):
        resolve_train_config({**cfg, "train": {**cfg["train"], "parentview": False}}, {})


@pytest.fixture(scope="module")
def tiff_slide(tmp_path_factory):
    """An Aperio-style TIFF pyramid (levels 1/4/16) and its tile table, for madflow.slides."""
    slides_mod = pytest.importorskip("madflow.slides")
    tifffile = pytest.importorskip("tifffile")
    root = tmp_path_factory.mktemp("tiff")
    size = 1024
    rng = np.random.default_rng(0)
    base = rng.integers(0, 256, size=(size // 16, size // 16, 3)).astype(np.uint8)
    lvl0 = np.repeat(np.repeat(base, 16, 0), 16, 1)
    levels = [lvl0, lvl0.reshape(256, 4, 256, 4, 3).mean((1, 3)).astype(np.uint8),
              lvl0.reshape(64, 16, 64, 16, 3).mean((1, 3)).astype(np.uint8)]
    path = root / "slide.svs"
    with tifffile.TiffWriter(path, bigtiff=False) as w:
        for n, im in enumerate(levels):
            desc = ("Aperio Image Library v12.0.0\n1024x1024 [0,0 1024x1024] (64x64) RAW|AppMag = 40|MPP = 0.25"
                    if n == 0 else "")
            w.write(im, tile=(64, 64), photometric="rgb", compression=None, description=desc, metadata=None)
    try:
        slides_mod.SlideReader(str(path))
    except Exception as e:  # noqa: BLE001
        pytest.skip(f"SlideReader cannot open the test TIFF: {e}")
    df = make_table("real", path, size, size, lambda x, y, s: 1.0)
    table = root / "real.parquet"
    df.to_parquet(table)
    return str(table), lvl0


def test_real_slide_reader_on_pyramidal_tiff(tiff_slide):
    """Integration with madflow.slides.SlideReader (the default reader)."""
    table, lvl0 = tiff_slide
    idx = D.TileIndex(D.load_tables([table]))
    ds = D.MADBatchDataset(idx, "mad", {"2.5->10": 1.0}, 2, 4, seed=0, total_steps=1,
                           augmenter=D.Augmenter(enabled=False))
    rows = ds.rows_for_step(0)
    teacher, student = ds.raw_views(rows)
    ref = NpyReader.__new__(NpyReader)
    ref.img = lvl0
    want = torch.from_numpy(ref.read_tiles(idx.df.iloc[rows["children"].ravel()])).permute(0, 3, 1, 2) / 255.0
    assert (student[:, :4].reshape(-1, 3, T, T) - want).abs().max() <= 2.0 / 255


def test_cli_with_provenance_config(tiff_slide, tmp_path):
    """python -m madflow.train as the pretrain rule calls it (config.json = provenance record)."""
    table, _ = tiff_slide
    cfg = tiny_cfg(steps=2, checkpoint_every=0, num_workers=1)
    cfg_path = tmp_path / "config.json"
    cfg_path.write_text(json.dumps({"experiment": "mad", "config": cfg, "git_commit": "x"}))
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "madflow.train", "--config", str(cfg_path), "--experiment", "mad",
           "--tables", table, "--out", str(out), "--seed", "0", "--device", "cpu"]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-4000:]
    assert os.path.isfile(out / "encoder.pt") and os.path.isfile(out / "checkpoints" / "last.pt")
    assert pd.read_csv(out / "train_log.tsv", sep="\t").step.tolist() == [0, 1]
    p = subprocess.run(cmd[:6] + ["nope"] + cmd[7:], capture_output=True, text=True, timeout=300)
    assert p.returncode != 0 and "nope" in p.stderr


# ----------------------------------------------------------------------------- training
def _weights(out):
    bb, meta = load_encoder(os.path.join(out, "encoder.pt"))
    return bb.state_dict(), meta


def _train(cfg, out, exp="mad", seed=0, **kw):
    from madflow.train import train

    return train(cfg, cfg["experiments"][exp], [], out, seed, device="cpu", experiment_name=exp, **kw)


def _train_tables(cfg, slides, out, exp="mad", seed=0, **kw):
    from madflow.train import train

    return train(cfg, cfg["experiments"][exp], slides, out, seed, device="cpu", experiment_name=exp,
                 reader_factory=NpyReader, **kw)


def test_train_writes_outputs_and_is_deterministic(slides, tmp_path):
    cfg = tiny_cfg(steps=3)
    s1 = _train_tables(cfg, slides, str(tmp_path / "a"))
    _train_tables(cfg, slides, str(tmp_path / "b"))
    w1, meta = _weights(str(tmp_path / "a"))
    w2, _ = _weights(str(tmp_path / "b"))
    for k in w1:
        assert torch.equal(w1[k], w2[k]), k
    assert meta["arch"] == "vit_small_patch16_224" and meta["img_size"] == T and meta["steps"] == 3
    logdf = pd.read_csv(tmp_path / "a" / "train_log.tsv", sep="\t")
    assert list(logdf.columns) == ["step", "pair", "loss", "lr", "wd", "momentum", "teacher_temp",
                                   "teacher_entropy", "kl_teacher_student", "prototypes_used", "mag_offset", "seconds"]
    assert logdf.step.tolist() == [0, 1, 2]
    assert set(logdf.pair) <= {"2.5->10", "10->40"}
    assert np.isfinite(logdf.loss).all() and (logdf.prototypes_used >= 1).all()
    assert os.path.isfile(tmp_path / "a" / "checkpoints" / "last.pt")
    # a different seed gives different weights
    _train_tables(cfg, slides, str(tmp_path / "c"), seed=1)
    w3, _ = _weights(str(tmp_path / "c"))
    assert any(not torch.equal(w1[k], w3[k]) for k in w1)
    assert s1["steps"] == 3


def test_workers_do_not_change_the_result(slides, tmp_path):
    cfg0 = tiny_cfg(steps=3)
    cfg2 = tiny_cfg(steps=3, num_workers=2)
    _train_tables(cfg0, slides, str(tmp_path / "w0"))
    _train_tables(cfg2, slides, str(tmp_path / "w2"))
    a, _ = _weights(str(tmp_path / "w0"))
    b, _ = _weights(str(tmp_path / "w2"))
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_kill_and_resume_equals_uninterrupted(slides, tmp_path, caplog):
    cfg = tiny_cfg(steps=6, checkpoint_every=2)
    _train_tables(cfg, slides, str(tmp_path / "full"))
    out = str(tmp_path / "resumed")
    r = _train_tables(cfg, slides, out, stop_after=5)  # "killed" during step 5: last checkpoint at 4
    assert r.get("stopped") and not os.path.exists(os.path.join(out, "encoder.pt"))
    ck = torch.load(os.path.join(out, "checkpoints", "last.pt"), weights_only=False)
    assert ck["step"] == 4 and ck["sampler"]["next_step"] == 4
    os.remove(os.path.join(out, "train_log.tsv"))  # Snakemake deletes a killed job's declared outputs
    with caplog.at_level(logging.INFO, logger="madflow.train"):
        _train_tables(cfg, slides, out)
    assert "resuming from step 4" in caplog.text
    a, _ = _weights(str(tmp_path / "full"))
    b, _ = _weights(out)
    for k in a:
        assert torch.equal(a[k], b[k]), k
    la = pd.read_csv(tmp_path / "full" / "train_log.tsv", sep="\t")
    lb = pd.read_csv(os.path.join(out, "train_log.tsv"), sep="\t")
    assert lb.step.tolist() == list(range(6))
    assert np.allclose(la.loss, lb.loss) and (la.pair == lb.pair).all()


@pytest.mark.parametrize("exp", ["same_mag", "shuffled", "interp", "pair_10_40", "tri"])
def test_ablation_modes_train(slides, tmp_path, exp):
    cfg = tiny_cfg(steps=2, checkpoint_every=0)
    _train_tables(cfg, slides, str(tmp_path / exp), exp=exp)
    w, meta = _weights(str(tmp_path / exp))
    assert meta["mode"] == cfg["experiments"][exp].get("mode", "mad")
    logdf = pd.read_csv(tmp_path / exp / "train_log.tsv", sep="\t", dtype={"pair": str})
    if exp == "pair_10_40":
        assert set(logdf.pair) == {"10->40"}
    if exp == "tri":
        assert set(logdf.pair) == {"2.5->10->40"}
    if exp == "same_mag":
        assert set(logdf.pair) <= {"2.5", "10", "40"}


def test_supervised_control_learns_labels_and_resumes(slides, tmp_path):
    # label the tiles by slide half: a pure class for every tile, at every magnification
    labelled = []
    for n, p in enumerate(slides):
        df = pd.read_parquet(p)
        df["label"] = pd.Series(np.where(df.x0 + df.size0 / 2 < 512, "left", "right"), dtype="string")
        df["label_purity"] = np.float32(1.0)
        df.loc[(df.mag == 40) & (df.index % 7 == 0), "label_purity"] = np.float32(0.5)  # never sampled
        q = str(tmp_path / f"labelled{n}.parquet")
        df.to_parquet(q)
        labelled.append(q)
    cfg = tiny_cfg(steps=4, checkpoint_every=2)
    cfg["experiments"]["supervised"] = {"mode": "supervised"}
    _train_tables(cfg, labelled, str(tmp_path / "s"), exp="supervised")
    w, meta = _weights(str(tmp_path / "s"))
    assert meta["mode"] == "supervised" and meta["which"] == "backbone" and meta["classes"] == ["left", "right"]
    logdf = pd.read_csv(tmp_path / "s" / "train_log.tsv", sep="\t", dtype={"pair": str})
    assert logdf.step.tolist() == [0, 1, 2, 3] and set(logdf.pair) <= {"2.5", "10", "40"}
    assert np.isfinite(logdf.loss).all() and logdf.teacher_entropy.isna().all()
    # the sampler draws only labelled, pure tiles, as many per step as a MAD batch has images
    index = D.TileIndex(D.load_tables(labelled))
    rows = D.sample_batch(index, "supervised", "40", 8, 4, np.random.default_rng(0))["parents"]
    assert len(rows) == 8 * 5 and (index.df.label_purity.iloc[rows] >= 0.8).all()
    # killed after 3 steps and resumed == uninterrupted
    _train_tables(cfg, labelled, str(tmp_path / "k"), exp="supervised", stop_after=3)
    _train_tables(cfg, labelled, str(tmp_path / "k"), exp="supervised")
    again, _ = _weights(str(tmp_path / "k"))
    for k in w:
        assert torch.equal(w[k], again[k]), k
    assert pd.read_csv(tmp_path / "k" / "train_log.tsv", sep="\t").step.tolist() == [0, 1, 2, 3]
    # tables without labels: a clear error
    with pytest.raises(ValueError, match="labelled tiles"):
        _train_tables(cfg, slides, str(tmp_path / "u"), exp="supervised")


def test_random_init_and_color_stats(tmp_path):
    cfg = tiny_cfg()
    _train(cfg, str(tmp_path / "r"), exp="random_init")
    w, meta = _weights(str(tmp_path / "r"))
    assert meta["mode"] == "random_init" and meta["steps"] == 0
    _train(cfg, str(tmp_path / "c"), exp="color_stats")
    bb, meta = load_encoder(str(tmp_path / "c" / "encoder.pt"))
    assert bb is None and meta["mode"] == "color_stats"
    assert os.path.isfile(tmp_path / "c" / "train_log.tsv")


def test_collapse_warning(slides, tmp_path, caplog):
    # a very hot teacher is uniform: entropy = ln K -> warning after warm-up
    cfg = tiny_cfg(steps=4, teacher_temp=[100.0, 100.0], warmup_frac=0.0, checkpoint_every=0)
    with caplog.at_level(logging.WARNING, logger="madflow.train"):
        _train_tables(cfg, slides, str(tmp_path / "col"))
    assert "collapse" in caplog.text and "uniform" in caplog.text


def test_ddp_two_ranks_identical_weights(slides, tmp_path):
    """torchrun, 2 processes, gloo on CPU: both ranks end with the same student and teacher."""
    out = tmp_path / "ddp"
    cfg_path = tmp_path / "cfg.json"
    cfg_path.write_text(json.dumps(tiny_cfg(steps=3, checkpoint_every=0)))
    script = tmp_path / "run_ddp.py"
    script.write_text(textwrap.dedent(f"""
        import json, os, sys, torch
        sys.path.insert(0, {HERE!r})
        from test_train import NpyReader
        from madflow.train import train
        cfg = json.load(open({str(cfg_path)!r}))
        r = train(cfg, {{}}, {slides!r}, {str(out)!r}, 0, device="cpu", experiment_name="mad",
                  reader_factory=NpyReader)
        m = r["model"]
        torch.save({{"student": m.student.state_dict(), "teacher": m.teacher.state_dict()}},
                   os.path.join({str(out)!r}, "rank%s.pt" % os.environ["RANK"]))
    """))
    env = dict(os.environ)
    env.pop("OMP_NUM_THREADS", None)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(script)]
    p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-4000:]
    r0 = torch.load(out / "rank0.pt", weights_only=False)
    r1 = torch.load(out / "rank1.pt", weights_only=False)
    for part in ("student", "teacher"):
        for k in r0[part]:
            assert torch.equal(r0[part][k], r1[part][k]), (part, k)
    # only rank 0 writes the outputs; the log covers every step once
    logdf = pd.read_csv(out / "train_log.tsv", sep="\t")
    assert logdf.step.tolist() == [0, 1, 2]
    assert os.path.isfile(out / "encoder.pt")


# ----------------------------------------------------------------------------- two stages
def test_pooled_multicrop_batches(index):
    """Stage 1 (mode dino): tiles of every magnification in one batch; the teacher sees the
    student's two global crops, augmented once; local crops are smaller fields of the tile."""
    ds = _ds(index, "dino", aug=False)
    rows = ds.rows_for_step(3)
    assert rows["group"] == "2.5+10+40" and rows["children"].shape == (8, 0)
    assert len(set(index.mag[rows["parents"]])) > 1
    batch = ds.batch_for_step(3)
    assert batch["teacher"].shape == (8, 2, 3, T, T) and batch["student"].shape == (8, 6, 3, T, T)
    assert torch.equal(batch["teacher"], batch["student"][:, :2])
    boxes = D.dataset.MultiCrop(n_local=4).boxes(100, T, np.random.default_rng(0)).reshape(100, 6, 5)
    area = (boxes[..., 3] - boxes[..., 1]) * (boxes[..., 4] - boxes[..., 2]) / T ** 2
    assert (area[:, :2] >= 0.5 * 0.74).all() and (area[:, 2:] <= 0.4 + 1e-9).all()
    assert (boxes[..., 1] >= 0).all() and (boxes[..., 3] <= T + 1e-9).all()


def test_multiview_teacher_loss_skips_each_views_own_target():
    from madflow.loss import DINOLoss

    torch.manual_seed(0)
    loss = DINOLoss(16, 0.1, 0.04).eval()
    student, teacher = torch.randn(4, 5, 16), torch.randn(4, 2, 16)
    got = loss(student, teacher, 0)
    t = torch.softmax(teacher / 0.04, -1)
    log_s = torch.log_softmax(student / 0.1, -1)
    want = torch.stack([-(t[:, g] * log_s[:, v]).sum(-1) for g in range(2) for v in range(5) if v != g]).mean()
    torch.testing.assert_close(got, want)


def test_stage_two_starts_from_stage_one(slides, tmp_path):
    cfg = tiny_cfg(steps=2, checkpoint_every=0)
    _train_tables(cfg, slides, str(tmp_path / "base"), exp="base")
    base = torch.load(tmp_path / "base" / "encoder.pt", weights_only=True)
    assert base["head_state_dict"] and base["meta"]["teacher_initial_share"] < 1
    with pytest.raises(ValueError, match="init"):
        _train_tables(cfg, slides, str(tmp_path / "nope"), exp="mad_from_base")
    cfg0 = tiny_cfg(steps=1, checkpoint_every=0, lr=0.0, min_lr=0.0, momentum=[1.0, 1.0])
    out = _train_tables(cfg0, slides, str(tmp_path / "mad"), exp="mad_from_base",
                        init_path=str(tmp_path / "base" / "encoder.pt"))
    # with lr 0 and momentum 1 the stage-2 teacher is still exactly stage 1
    for k, v in out["model"].teacher.backbone.state_dict().items():
        assert torch.equal(v, base["state_dict"][k]), k
    with pytest.raises(ValueError, match="another experiment"):
        from madflow.config import resolve_train_config

        resolve_train_config(cfg, {"name": "base", "mode": "dino", "init": "base"})


@pytest.mark.parametrize("head_bn", ["batch", "running"])
def test_head_bn_running_keeps_the_starts_statistics(slides, tmp_path, head_bn):
    cfg = tiny_cfg(steps=2, checkpoint_every=0)
    cfg["model"]["head"]["use_bn"] = True
    _train_tables(cfg, slides, str(tmp_path / "base"), exp="base")
    start = torch.load(tmp_path / "base" / "encoder.pt", weights_only=True)["head_state_dict"]
    out = _train_tables(tiny_cfg(steps=2, checkpoint_every=0, head_bn=head_bn) | {"model": cfg["model"]},
                        slides, str(tmp_path / head_bn), exp="mad_from_base",
                        init_path=str(tmp_path / "base" / "encoder.pt"))
    model = out["model"]
    moved = {(name, k): not torch.equal(v, start[k]) for name, net in (("s", model.student), ("t", model.teacher))
             for k, v in net.head.state_dict().items() if k.endswith(("running_mean", "running_var"))}
    assert len(moved) == 8
    # batch statistics update the running ones; frozen ones stay those of stage 1
    assert all(moved.values()) if head_bn == "batch" else not any(moved.values())
    # the student still learns either way (its head's first layer moved)
    assert not torch.equal(model.student.head.mlp[0].weight, start["mlp.0.weight"])
    with pytest.raises(ValueError, match="head_bn"):
        _train_tables(tiny_cfg(steps=1, head_bn="frozen"), slides, str(tmp_path / "bad"))


def test_mag_offset_is_logged_and_the_moment_term_lowers_it(slides, tmp_path):
    logs = {}
    for weight in (0.0, 50.0):
        _train_tables(tiny_cfg(steps=6, checkpoint_every=0, moment_weight=weight), slides, str(tmp_path / f"w{weight}"))
        logs[weight] = pd.read_csv(tmp_path / f"w{weight}" / "train_log.tsv", sep="\t")
    assert (logs[0.0]["mag_offset"] > 0).all()
    # same seed, same first batch: the same offset before the first update, then the term pulls it down
    assert logs[50.0]["mag_offset"].iloc[0] == pytest.approx(logs[0.0]["mag_offset"].iloc[0])
    assert logs[50.0]["mag_offset"].iloc[-3:].mean() < 0.5 * logs[0.0]["mag_offset"].iloc[-3:].mean()
    # multi-crop stage 1 has no parent/child pair: no offset, an empty cell
    _train_tables(tiny_cfg(steps=1, checkpoint_every=0), slides, str(tmp_path / "base"), exp="base")
    assert pd.read_csv(tmp_path / "base" / "train_log.tsv", sep="\t")["mag_offset"].isna().all()


def test_precision_and_compile_settings(slides, tmp_path):
    for setting, value in (("precision", "fp16"), ("compile", "sometimes")):
        with pytest.raises(ValueError, match=f"train.{setting}"):
            _train_tables(tiny_cfg(steps=1, **{setting: value}), slides, str(tmp_path / "bad"))
    cfg = tiny_cfg(steps=2, checkpoint_every=0)
    default = _train_tables(cfg, slides, str(tmp_path / "default"))["model"].teacher.state_dict()
    # on CPU "auto" is plain fp32, uncompiled: forcing both changes nothing
    forced = _train_tables(tiny_cfg(steps=2, checkpoint_every=0, precision="fp32", compile=False), slides,
                           str(tmp_path / "forced"))["model"].teacher.state_dict()
    assert all(torch.equal(v, forced[k]) for k, v in default.items())
    bf16 = _train_tables(tiny_cfg(steps=2, checkpoint_every=0, precision="bf16"), slides, str(tmp_path / "bf16"))
    assert np.isfinite(pd.read_csv(tmp_path / "bf16" / "train_log.tsv", sep="\t")["loss"]).all()
    assert not all(torch.equal(v, bf16["model"].teacher.state_dict()[k]) for k, v in default.items())


@pytest.mark.slow
def test_compiled_step_matches_the_eager_one(slides, tmp_path):
    """torch.compile changes how the step is computed, not what: weights after two steps agree
    with the eager run to float rounding."""
    eager = _train_tables(tiny_cfg(steps=2, checkpoint_every=0), slides, str(tmp_path / "eager"))
    compiled = _train_tables(tiny_cfg(steps=2, checkpoint_every=0, compile=True), slides, str(tmp_path / "compiled"))
    want = eager["model"].teacher.state_dict()
    for k, v in compiled["model"].teacher.state_dict().items():
        torch.testing.assert_close(v, want[k], rtol=1e-3, atol=1e-4)


def test_teacher_views_all_scores_every_student_view(slides, tmp_path):
    """teacher_views: all — the teacher's outputs cover every student view (children and the
    parent view), so the loss pairs each view with every other; it needs the parent view."""
    from madflow.train.steps import DINOObjective

    cfg = tiny_cfg(steps=2, checkpoint_every=0, teacher_views="all")
    _train_tables(cfg, slides, str(tmp_path / "all"))
    log = pd.read_csv(tmp_path / "all" / "train_log.tsv", sep="\t")
    assert np.isfinite(log["loss"]).all() and (log["mag_offset"] > 0).all()
    index = D.TileIndex(D.load_tables(slides))
    from madflow.config import resolve_train_config

    _, train_cfg, model_cfg = resolve_train_config(cfg, {})
    objective = DINOObjective(train_cfg, model_cfg, index, T, 2, torch.device("cpu"))
    batch = D.MADBatchDataset(index, "mad", train_cfg["pairs"], 8, 4, 0, 2, reader_factory=NpyReader).batch_for_step(0)
    objective.train_mode()
    objective.step(batch, 0)
    # the multi-view loss saw a [B, V, K] teacher: entropy averaged over B x V teacher outputs
    assert objective.loss.last_stats["teacher_argmax"].numel() == 8 * batch["student"].shape[1]
    with pytest.raises(ValueError, match="teacher_views"):
        _train_tables(tiny_cfg(steps=1, teacher_views="all", parent_view=False), slides, str(tmp_path / "bad"))
