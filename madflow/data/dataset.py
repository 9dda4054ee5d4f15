"""Training batches as image tensors: the rows a sampler chose, read from the slides and
augmented, one ready batch per step (a pure function of seed, step and rank)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from torch.utils.data import IterableDataset, get_worker_info

from madflow.data.augment import Augmenter
from madflow.data.index import TileIndex
from madflow.data.sampling import choose_group, group_weights, parse_pair, sample_batch
from madflow.modes import MODES, get_mode


def interp_views(parent_px: torch.Tensor, parent_rows: pd.DataFrame, child_rows: pd.DataFrame,
                 size: int) -> torch.Tensor:
    """Crop each parent tile at the sub-square covered by the corresponding child and
    upsample it to ``size`` px (bilinear). parent_px: float [N, 3, T, T]; rows aligned."""
    T = parent_px.shape[-1]
    out = torch.empty(parent_px.shape[0], 3, size, size, dtype=parent_px.dtype)
    px0 = parent_rows["x0"].to_numpy(np.int64)
    py0 = parent_rows["y0"].to_numpy(np.int64)
    ps0 = parent_rows["size0"].to_numpy(np.float64)
    cx0 = child_rows["x0"].to_numpy(np.int64)
    cy0 = child_rows["y0"].to_numpy(np.int64)
    cs0 = child_rows["size0"].to_numpy(np.float64)
    for n in range(parent_px.shape[0]):
        scale = T / ps0[n]  # parent px per level-0 px
        x0 = int(round((cx0[n] - px0[n]) * scale))
        y0 = int(round((cy0[n] - py0[n]) * scale))
        s = max(1, int(round(cs0[n] * scale)))
        crop = parent_px[n:n + 1, :, y0:y0 + s, x0:x0 + s]
        out[n] = F.interpolate(crop, size=(size, size), mode="bilinear", align_corners=False)[0]
    return out



@dataclass
class MultiCrop:
    """DINO's multi-crop: ``n_global`` random-resized crops covering ``global_scale`` of the
    tile's area and ``n_local`` covering ``local_scale``, each resized back to the tile's
    side (bilinear, torchvision's roi_align), aspect ratio log-uniform in [3/4, 4/3]."""

    n_global: int = 2
    n_local: int = 4
    global_scale: tuple = (0.5, 1.0)
    local_scale: tuple = (0.1, 0.4)

    def boxes(self, n_tiles: int, size: int, rng: np.random.Generator) -> np.ndarray:
        """[n_tiles * (n_global + n_local), 5] boxes (tile index, x0, y0, x1, y1) in pixels."""
        views = self.n_global + self.n_local
        scale = np.concatenate([rng.uniform(*self.global_scale, size=(n_tiles, self.n_global)),
                                rng.uniform(*self.local_scale, size=(n_tiles, self.n_local))], axis=1)
        ratio = np.exp(rng.uniform(np.log(3 / 4), np.log(4 / 3), size=(n_tiles, views)))
        w = np.minimum(np.sqrt(scale * ratio), 1.0) * size
        h = np.minimum(np.sqrt(scale / ratio), 1.0) * size
        x0 = rng.random((n_tiles, views)) * (size - w)
        y0 = rng.random((n_tiles, views)) * (size - h)
        tile = np.repeat(np.arange(n_tiles)[:, None], views, axis=1)
        return np.stack([tile, x0, y0, x0 + w, y0 + h], axis=-1).reshape(-1, 5)

    def __call__(self, tiles: torch.Tensor, rng: np.random.Generator) -> torch.Tensor:
        """float [N, 3, T, T] -> [N, n_global + n_local, 3, T, T] (globals first)."""
        from torchvision.ops import roi_align

        N, _, T, _ = tiles.shape
        boxes = torch.as_tensor(self.boxes(N, T, rng), dtype=tiles.dtype)
        crops = roi_align(tiles, boxes, output_size=(T, T), spatial_scale=1.0, sampling_ratio=2, aligned=True)
        return crops.reshape(N, self.n_global + self.n_local, 3, T, T)


def _default_reader_factory(path: str):
    from madflow.slides import SlideReader

    return SlideReader(path)


class MADBatchDataset(IterableDataset):
    """Yields one ready batch per training step for steps ``start_step .. total_steps-1``.

    Batch of step s on rank r is a pure function of (seed, s, r): the group (pair) is drawn
    from ``rng(seed, s)`` (the same on every rank), rows from ``rng(seed, s, r, 0)`` and
    augmentations from ``rng(seed, s, r, 1)``. With several DataLoader workers, worker w
    produces the steps with ``(s - start_step) % n_workers == w``; the DataLoader returns
    them in step order. Use with ``DataLoader(ds, batch_size=None)``.

    Each item: ``{"step", "group", "teacher": [B,3,T,T], "student": [B,V,3,T,T],
    "parents": [B], "children": [B, n]}`` (rows into ``index.df``).
    """

    def __init__(self, index: TileIndex, mode: str, pairs: dict, n_parents: int, n_local: int,
                 seed: int, total_steps: int, start_step: int = 0, rank: int = 0,
                 parent_view: bool = True, augmenter: Augmenter | None = None,
                 reader_factory: Callable[[str], object] | None = None,
                 same_mag_weight: Sequence[float] | None = None,
                 crops: MultiCrop | None = None):
        super().__init__()
        spec = get_mode(mode)
        if not spec.trains:
            raise ValueError(f"mode {mode!r} does not train a network")
        self.index = index
        self.mode = spec.name
        self.groups = group_weights(spec, pairs)
        # modes with cross-scale views: per step, the probability of a same-magnification
        # (plain DINO) batch instead; None or all zero = cross-scale batches only
        w = None if same_mag_weight is None else np.asarray(same_mag_weight, dtype=np.float64)
        cross_scale = spec.groups in ("pairs", "chain")
        self.same_mag_weight = w if cross_scale and w is not None and w.any() else None
        self.same_mag_groups = group_weights("same_mag", pairs) if self.same_mag_weight is not None else {}
        for g in self.groups:  # fail early on pairs the tables cannot serve
            if spec.sampler == "labelled":
                if not len(index.labelled_rows(float(g))):
                    raise ValueError(f"mode {spec.name} needs labelled tiles at {g}x "
                                     f"(label purity >= {index.min_purity}); the tile tables have none")
            elif spec.groups in ("mags", "pooled"):
                for m in g.split("+"):
                    index.rows_at(float(m))
            else:
                index.eligible(parse_pair(g), n_local)
        for g in self.same_mag_groups:
            index.rows_at(float(g))
        self.n_parents = int(n_parents)
        self.n_local = int(n_local)
        self.seed = int(seed)
        self.total_steps = int(total_steps)
        self.start_step = int(start_step)
        self.rank = int(rank)
        self.parent_view = bool(parent_view)
        self.augmenter = augmenter if augmenter is not None else Augmenter()
        self.reader_factory = reader_factory or _default_reader_factory
        self._readers: dict = {}
        self.tile_px = index.tile_px
        self.crops = crops if crops is not None else MultiCrop(n_local=n_local)

    # -- rng streams --------------------------------------------------------------------
    def group_for_step(self, step: int) -> tuple[str, str]:
        """(mode, group) of a step's batch: a pure function of (seed, step)."""
        rng = np.random.default_rng([self.seed, int(step), 7919])
        if self.same_mag_weight is not None:
            w = self.same_mag_weight[min(int(step), len(self.same_mag_weight) - 1)]
            if rng.random() < w:
                return "same_mag", choose_group(self.same_mag_groups, rng)
        return self.mode, choose_group(self.groups, rng)

    def rows_for_step(self, step: int) -> dict:
        mode, group = self.group_for_step(step)
        rng = np.random.default_rng([self.seed, int(step), self.rank, 0])
        return sample_batch(self.index, mode, group, self.n_parents, self.n_local, rng)

    # -- pixels -------------------------------------------------------------------------
    def _reader(self, path: str):
        r = self._readers.get(path)
        if r is None:
            r = self._readers[path] = self.reader_factory(path)
        return r

    def read_rows(self, rows: np.ndarray) -> torch.Tensor:
        """uint8 pixels of ``rows`` (any shape) -> float [*rows.shape, 3, T, T] in [0, 1]."""
        flat = np.asarray(rows, dtype=np.int64).ravel()
        uniq, inv = np.unique(flat, return_inverse=True)
        sub = self.index.df.iloc[uniq]
        T = self.tile_px
        px = np.empty((len(uniq), T, T, 3), dtype=np.uint8)
        paths = sub["path"].astype(str).to_numpy()
        for path in pd.unique(paths):
            sel = np.flatnonzero(paths == path)
            imgs = np.asarray(self._reader(path).read_tiles(sub.iloc[sel]))
            if imgs.shape != (len(sel), T, T, 3):
                raise ValueError(f"reader returned {imgs.shape} for {len(sel)} tiles of {T} px from {path}")
            px[sel] = imgs
        t = torch.from_numpy(px).permute(0, 3, 1, 2).float().div_(255.0)
        t = t[torch.from_numpy(inv.reshape(-1))]
        return t.reshape(*np.shape(rows), 3, T, T)

    def raw_views(self, rows: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """Un-augmented teacher [B,3,T,T] and student [B,V,3,T,T] images in [0, 1]."""
        parents, children = rows["parents"], rows["children"]
        B, n = children.shape
        T = self.tile_px
        teacher = self.read_rows(parents)
        student_views = MODES[rows["mode"]].student
        if student_views == "parent_crops":
            prow = self.index.df.iloc[np.repeat(parents, n)]
            crow = self.index.df.iloc[children.ravel()]
            ppx = teacher.repeat_interleave(n, dim=0)
            student = interp_views(ppx, prow, crow, T).reshape(B, n, 3, T, T)
        elif student_views == "parent":
            student = teacher.unsqueeze(1).expand(B, n, 3, T, T).clone()
        else:
            student = self.read_rows(children)
        if self.parent_view and student_views is not None:
            student = torch.cat([student, teacher.unsqueeze(1)], dim=1)
        return teacher, student

    def batch_for_step(self, step: int) -> dict:
        rows = self.rows_for_step(step)
        arng = np.random.default_rng([self.seed, int(step), self.rank, 1])
        T = self.tile_px
        if MODES[rows["mode"]].student == "multicrop":
            # the teacher sees the student's global crops, augmented once
            views = self.crops(self.read_rows(rows["parents"]), arng)
            B, V = views.shape[:2]
            student = self.augmenter(views.reshape(B * V, 3, T, T), arng).reshape(B, V, 3, T, T)
            teacher = student[:, :self.crops.n_global]
        else:
            teacher, student = self.raw_views(rows)
            B, V = student.shape[:2]
            allv = self.augmenter(torch.cat([teacher, student.reshape(B * V, 3, T, T)]), arng)
            teacher, student = allv[:B], allv[B:].reshape(B, V, 3, T, T)
        return {
            "step": int(step),
            "group": rows["group"],
            "teacher": teacher.contiguous(),
            "student": student.contiguous(),
            "parents": torch.from_numpy(rows["parents"]),
            "children": torch.from_numpy(rows["children"]),
        }

    def __iter__(self):
        wi = get_worker_info()
        wid, nw = (wi.id, wi.num_workers) if wi is not None else (0, 1)
        for step in range(self.start_step + wid, self.total_steps, nw):
            yield self.batch_for_step(step)

    def __len__(self):
        return max(0, self.total_steps - self.start_step)
