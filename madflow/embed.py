"""Embeddings per slide per magnification (e_m(t) of docs/metrics.md): L2-normalised CLS
embeddings of every tissue tile, read through the native tile reader, written as one group
per magnification with `features` and `coords` datasets (docs/CONTRACTS.md; `snakemake
features` exports them in CLAM's and TRIDENT's layouts, madflow.features)."""

from __future__ import annotations

import logging

import numpy as np
import pandas as pd
import torch
from tqdm import tqdm

from madflow.data.augment import pixels_to_input
from madflow.io import write_atomic
from madflow.model import build_backbone, load_encoder
from madflow.modes import get_mode
from madflow.slides import SlideReader, mag_str

log = logging.getLogger(__name__)


def color_stats(pixels: np.ndarray) -> np.ndarray:
    """The shortcut floor: per-tile mean and std of each RGB channel (N, 6), in [0, 1]."""
    x = pixels.reshape(len(pixels), -1, 3).astype(np.float32) / 255.0
    return np.concatenate([x.mean(axis=1), x.std(axis=1)], axis=1)


def build_encoder(settings: dict, encoder_path: str | None, tile_px: int):
    """(callable uint8 (N,T,T,3) -> float (N,D), description) for an experiment: the network
    comes from the trained encoder's own metadata, or from an external entry's arch/kwargs."""
    mode = get_mode(settings.get("mode"))
    if mode.embed == "color_stats":
        return color_stats, "color_stats (mean, std per RGB channel)"
    if mode.embed == "external":
        backbone = build_backbone(settings["arch"], settings.get("kwargs") or {}, settings.get("checkpoint"), tile_px)
        name = f"external:{settings['arch']}" + (f" ({settings['checkpoint']})" if settings.get("checkpoint") else "")
        tile_norm = bool(settings.get("tile_norm", False))
    else:
        backbone, meta = load_encoder(encoder_path)
        which = "backbone trained with labels" if mode.objective == "supervised" else "teacher backbone"
        name = f"{meta.get('arch')} {which} ({mode.name}, seed {meta.get('seed')})"
        tile_norm = bool(meta.get("tile_norm", False))
    return backbone_encoder(backbone, tile_norm), name


def backbone_encoder(backbone: torch.nn.Module, tile_norm: bool):
    """callable uint8 (N,T,T,3) -> float (N,D): the backbone's CLS features (on the GPU when
    there is one), the tiles normalised as in training."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    backbone.to(device).eval()

    @torch.inference_mode()
    def forward(pixels: np.ndarray) -> np.ndarray:
        x = pixels_to_input(pixels, tile_norm, device)
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=device == "cuda"):
            feats = backbone(x)
        return feats.float().cpu().numpy()

    return forward


def l2_normalise(x: np.ndarray) -> np.ndarray:
    return (x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)).astype(np.float32)


def embed_slide(table_path: str, encode, encoder_name: str, out_path: str, batch_size: int = 256):
    """Embed every tissue tile of one slide at every magnification it has."""
    import h5py

    grid = pd.read_parquet(table_path)
    tiles = grid[grid["tissue"]].reset_index(drop=True)
    slide_id = str(grid["slide_id"].iloc[0])
    feats = {}
    with SlideReader(grid["path"].iloc[0]) as reader:
        for mag, rows in tiles.groupby("mag", sort=True):
            chunks = []
            tile_px = int(rows["tile_px"].iloc[0])
            pixels = np.empty((min(batch_size, len(rows)), tile_px, tile_px, 3), np.uint8)  # reused per batch
            for start in tqdm(range(0, len(rows), batch_size), desc=f"{slide_id} {mag_str(mag)}x", leave=False):
                batch = rows.iloc[start : start + batch_size]
                chunks.append(encode(reader.read_tiles(batch, out=pixels[: len(batch)])))
            feats[mag] = (rows, l2_normalise(np.concatenate(chunks)))
            log.info("%s %sx: %d tiles embedded", slide_id, mag_str(mag), len(rows))

    def write(tmp):
        with h5py.File(tmp, "w") as h5:
            h5.attrs["slide_id"] = slide_id
            h5.attrs["encoder"] = encoder_name
            for mag, (rows, x) in feats.items():
                g = h5.create_group(mag_str(mag) + "x")
                g.create_dataset("features", data=x)
                g.create_dataset("coords", data=rows[["x0", "y0"]].to_numpy(np.int64))
                for col in ("i", "j", "k", "m"):
                    g.create_dataset(col, data=rows[col].fillna(-1).to_numpy(np.int32))
                g.attrs.update(
                    encoder=encoder_name,
                    magnification=float(mag),
                    patch_size_level0=int(rows["size0"].iloc[0]),
                    tile_px=int(rows["tile_px"].iloc[0]),
                )

    write_atomic(out_path, write)

