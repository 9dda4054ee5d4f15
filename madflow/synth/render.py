"""The procedural tissue model and renderer of the synthetic slides (design: madflow.synth)."""

from __future__ import annotations

import numpy as np

from madflow.synth.pyramid import TILE

CLASSES: list[str] = ["tumor", "stroma", "lymphoid", "necrosis"]
CLASS_COLORS = {"tumor": [200, 0, 0], "stroma": [150, 200, 150], "lymphoid": [160, 90, 160],
                "necrosis": [50, 50, 50]}

PX_PER_UM = 4.0          # level 0 = 40x = 0.25 um/px
CELL = 16                # label grid cell, level-0 px (4 um)
REGION = 1024            # class-region block, level-0 px (256 um)
ARCH = 8                 # architecture field grid, level-0 px (2 um)
NB = 1024                # OD histogram bins
ODMAX = 3.0
_NOISE = 512             # side of the periodic noise tiles (level-0 px)

# canonical stain OD vectors (Ruifrok & Johnston), rows H, E
_VH = np.array([0.650, 0.704, 0.286])
_VE = np.array([0.072, 0.990, 0.105])
_VH /= np.linalg.norm(_VH)
_VE /= np.linalg.norm(_VE)

# per-class pixel-shader constants (index = class)
_HBG = np.array([0.10, 0.05, 0.12, 0.16], np.float32)     # diffuse haematoxylin
_FAMP = np.array([0.0, 0.55, 0.0, 0.0], np.float32)     # fibre texture amplitude
_GAMP = np.array([0.35, 0.25, 0.3, 0.9], np.float32)      # granular eosin noise


def _um(v):
    return v * PX_PER_UM


# --------------------------------------------------------------------------- hashing/noise
_P1 = np.uint64(0x9E3779B97F4A7C15)
_P2 = np.uint64(0xC2B2AE3D27D4EB4F)


def _mix64(z):
    z = z ^ (z >> np.uint64(30))
    z = z * np.uint64(0xBF58476D1CE4E5B9)
    z = z ^ (z >> np.uint64(27))
    z = z * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


def _hash01(ix, iy, key):
    """Deterministic uniform [0, 1) float32 for integer lattice coordinates (broadcasting)."""
    ix = np.atleast_1d(np.asarray(ix, dtype=np.int64)).astype(np.uint64)
    iy = np.atleast_1d(np.asarray(iy, dtype=np.int64)).astype(np.uint64)
    z = _mix64(ix * _P1 + iy * _P2 + np.uint64(key & 0xFFFFFFFFFFFFFFFF))
    return (z >> np.uint64(40)).astype(np.float32) * np.float32(2.0 ** -24)


def _vnoise(X, Y, scale, key):
    """Smooth value noise in [0, 1] at level-0 px coordinates (feature size ~ scale px)."""
    gx = np.asarray(X, np.float64) / scale
    gy = np.asarray(Y, np.float64) / scale
    fx0 = np.floor(gx)
    fy0 = np.floor(gy)
    fx = (gx - fx0).astype(np.float32)
    fy = (gy - fy0).astype(np.float32)
    fx = fx * fx * (3 - 2 * fx)
    fy = fy * fy * (3 - 2 * fy)
    ix = fx0.astype(np.int64)
    iy = fy0.astype(np.int64)
    v00 = _hash01(ix, iy, key)
    v10 = _hash01(ix + 1, iy, key)
    v01 = _hash01(ix, iy + 1, key)
    v11 = _hash01(ix + 1, iy + 1, key)
    return v00 + (v10 - v00) * fx + (v01 - v00) * fy + (v00 - v10 - v01 + v11) * (fx * fy)


def _fbm(X, Y, scale, key, octaves=3):
    tot = 0.0
    amp = 1.0
    norm = 0.0
    for o in range(octaves):
        tot = tot + amp * _vnoise(X, Y, scale / 2 ** o, key + 7919 * o)
        norm += amp
        amp *= 0.5
    return tot / norm


def _worley(X, Y, spacing, key, jitter=0.8):
    """Nearest jittered-grid feature point: (distance px, hash of its cell, 2nd hash)."""
    X, Y = np.broadcast_arrays(np.asarray(X, np.float64), np.asarray(Y, np.float64))
    cx = np.floor(X / spacing).astype(np.int64)
    cy = np.floor(Y / spacing).astype(np.int64)
    best = np.full(X.shape, np.inf)
    bx = np.zeros(X.shape, np.int64)
    by = np.zeros(X.shape, np.int64)
    for dy in (-1, 0, 1):
        for dx in (-1, 0, 1):
            ix = cx + dx
            iy = cy + dy
            px = (ix + 0.5 + jitter * (_hash01(ix, iy, key) - 0.5)) * spacing
            py = (iy + 0.5 + jitter * (_hash01(ix, iy, key + 1) - 0.5)) * spacing
            d2 = (X - px) ** 2 + (Y - py) ** 2
            better = d2 < best
            best = np.where(better, d2, best)
            bx = np.where(better, ix, bx)
            by = np.where(better, iy, by)
    return np.sqrt(best), _hash01(bx, by, key + 2), _hash01(bx, by, key + 3)


def _smoothstep(a, b, x):
    t = np.clip((x - a) / (b - a), 0.0, 1.0)
    return t * t * (3 - 2 * t)


# --------------------------------------------------------------------------- slide params
# Benchmark variants. "shared": each class keeps its identity across scales through
# structure (no look-alikes between scales), and cells are small enough (cell_scale) that a
# 16 um 40x field of the demo's 64 px tiles holds several of them. "confusers": the hard
# variant, in which each class resembles another class at the next scale (tumour nuclei at
# 40x, lymphoid micro-aggregates at 10x and necrotic debris clumps at 2.5x are dark round
# blobs of the same pixel size) and nuclei are 8-13 um.
VARIANTS = {"shared": {"cell_scale": 0.6, "confusers": False},
            "confusers": {"cell_scale": 1.0, "confusers": True}}


class SlideModel:
    """All per-slide random parameters, drawn once from the seed."""

    def __init__(self, seed: int, size: int, variant: str = "shared"):
        if size % TILE or size < TILE:
            raise ValueError(f"size must be a positive multiple of {TILE}, got {size}")
        if variant not in VARIANTS:
            raise ValueError(f"unknown demo variant {variant!r}; known: {sorted(VARIANTS)}")
        self.variant = variant
        self.cell_scale = VARIANTS[variant]["cell_scale"]
        self.confusers = VARIANTS[variant]["confusers"]
        self.seed = int(seed)
        self.size = int(size)
        rng = np.random.default_rng(np.random.SeedSequence([self.seed, 0x5EED]))
        self.key = int(rng.integers(1, 2 ** 62))
        # biology: per-slide jitter of sizes/spacings (+-10-15%)
        j = lambda lo=0.88, hi=1.12: float(rng.uniform(lo, hi))  # noqa: E731
        self.gland_sp = _um(170) * j()
        self.follicle_sp = _um(420) * j()
        self.agg_sp = _um(48) * j(0.92, 1.08)
        self.clump_sp = _um(260) * j()
        self.fibre_dir = float(rng.uniform(0, np.pi))
        self.fibre_lambda = _um(3.2) * j()
        self.bundle_lambda = _um(45) * j()
        self.nuc_scale = [j(0.9, 1.1) * self.cell_scale for _ in CLASSES]
        # stain variation (applied after the per-class rank transform)
        vh = np.clip(_VH + rng.normal(0, 0.08, 3), 0.02, None)
        ve = np.clip(_VE + rng.normal(0, 0.08, 3), 0.02, None)
        self.vh = vh / np.linalg.norm(vh)
        self.ve = ve / np.linalg.norm(ve)
        self.sh = float(rng.uniform(0.7, 1.35))
        self.se = float(rng.uniform(0.7, 1.35))
        m0 = np.stack([_VH, _VE])                      # (2, 3)
        ms = np.stack([self.sh * self.vh, self.se * self.ve])
        pinv = np.linalg.pinv(m0)                      # (3, 2)
        self.stain_mix = (pinv @ ms + (np.eye(3) - pinv @ m0)).astype(np.float32)
        self.bg_od = rng.uniform(0.015, 0.05, 3).astype(np.float32)
        # periodic noise tiles (seamless, aligned to absolute coordinates)
        from scipy.ndimage import gaussian_filter

        def ntile(sigma):
            a = gaussian_filter(rng.random((_NOISE, _NOISE)), sigma, mode="wrap")
            a = (a - a.mean()) / (a.std() + 1e-9)
            return a.astype(np.float32)

        self.n_fine = ntile(0.7)
        self.n_mid = ntile(2.5)
        self.n_edge = ntile(6.0)
        self.sprites = _make_sprites(rng, self.nuc_scale)
        self._layout(rng)

    # ----------------------------------------------------------------- layout (label grid)
    def _layout(self, rng):
        S = self.size
        n = S // CELL
        # class regions: blocks of REGION px (256 um, the demo's 2.5x tile footprint) with
        # domain-warped borders, each class on a balanced share of blocks, so that most 2.5x
        # tiles are >= 80% one class (the evaluation's purity threshold) while borders still wander off the grid
        g = max(2, S // REGION)
        cs = S / g
        reps = np.resize(np.arange(len(CLASSES)), g * g)
        self.seed_cls = rng.permutation(reps).reshape(g, g).astype(np.uint8)
        cls = np.empty((n, n), np.uint8)
        tis = np.empty((n, n), bool)
        k = self.key
        xs = (np.arange(n) + 0.5) * CELL
        step = max(1, 1_000_000 // n)
        for r0 in range(0, n, step):
            Y = ((np.arange(r0, min(n, r0 + step)) + 0.5) * CELL)[:, None]
            X = xs[None, :]
            wx = X + 0.05 * cs * (_fbm(X, Y, 0.5 * cs, k + 11) - 0.5) * 2
            wy = Y + 0.05 * cs * (_fbm(X, Y, 0.5 * cs, k + 13) - 0.5) * 2
            gi = np.clip(np.floor(wy / cs).astype(int), 0, g - 1)
            gj = np.clip(np.floor(wx / cs).astype(int), 0, g - 1)
            lab = self.seed_cls[gi, gj]
            cls[r0:r0 + len(lab)] = lab
            # tissue: slide minus an irregular margin, minus a few tears
            X2, Y2 = np.broadcast_arrays(X, Y)
            db = np.minimum(np.minimum(X2, Y2), np.minimum(S - X2, S - Y2))
            margin = S * (0.005 + 0.03 * _fbm(X, Y, S / 4, k + 17)) + _um(40) * (
                _fbm(X, Y, _um(70), k + 19) - 0.5) * 2
            holes = _fbm(X, Y, _um(90), k + 23, octaves=2) > 0.80
            tis[r0:r0 + len(lab)] = (db > margin) & ~holes
        self.cls_grid = cls
        self.tis_grid = tis

    # ----------------------------------------------------------------- architecture
    def psi(self, X, Y):
        """Stream function of the stroma fibres (px): fibres follow its contours."""
        c, s = np.cos(self.fibre_dir), np.sin(self.fibre_dir)
        return (-X * s + Y * c) + _um(70) * (_fbm(X, Y, _um(160), self.key + 31, 2) - 0.5) * 2

    def arch(self, c, X, Y):
        """(cellularity in [0,1], eosin level) of class c at points X, Y (1-D arrays, px)."""
        k = self.key + 1000 * (c + 1)
        if c == 0:  # tumour: glands with lumens lined by crowded epithelium, solid nests
            d, h1, h2 = _worley(X, Y, self.gland_sp, k, 0.7)
            rl = _um(12) + _um(30) * h1
            t = _um(18) + _um(12) * h2
            lum = 1 - _smoothstep(rl - _um(2), rl + _um(2), d)
            ring = 1 - _smoothstep(rl + t - _um(4), rl + t + _um(4), d)
            dens = (1 - lum) * (0.38 + 0.62 * ring)
            ecm = 0.12 * lum + (1 - lum) * (0.5 + 0.2 * (1 - ring))
        elif c == 1:  # stroma: fascicles (bundles and clefts) of collagen, sparse spindles
            ps = self.psi(X, Y)
            b = 0.5 + 0.5 * np.sin(2 * np.pi * ps / self.bundle_lambda
                                   + 4 * _vnoise(X, Y, _um(90), k + 1))
            dens = 0.2 + 0.45 * b
            ecm = 0.15 + 0.75 * _smoothstep(0.1, 0.6, b)
        elif c == 2:  # lymphoid: follicles (germinal centre + mantle) and micro-aggregates
            d, h1, _ = _worley(X, Y, self.follicle_sp, k, 0.6)
            rf = _um(130) + _um(50) * h1
            gc = 1 - _smoothstep(0.45 * rf, 0.65 * rf, d)
            foll = 1 - _smoothstep(0.9 * rf, 1.1 * rf, d)
            d2, a1, _ = _worley(X, Y, self.agg_sp, k + 5, 0.8)
            ra = _um(16) + _um(8) * a1             # 32-48 um aggregates (10x confuser)
            agg = 1 - _smoothstep(ra - _um(3), ra + _um(3), d2)
            base = 0.8 + 0.2 * foll * (1 - gc) - 0.25 * gc
            dens = base * (0.5 + 0.5 * agg) if self.confusers else 0.6 * base
            ecm = 0.28 + 0.25 * gc
        else:  # necrosis: geographic debris clumps (2.5x confuser) in granular eosin
            dj = _um(25) * (_fbm(X, Y, _um(40), k + 7, 2) - 0.5) * 2
            d, h1, _ = _worley(X, Y, self.clump_sp, k, 0.8)
            rc = _um(55) + _um(35) * h1
            clump = 1 - _smoothstep(rc - _um(10), rc + _um(10), d + dj)
            if not self.confusers:  # debris spread evenly, no clumps
                clump = 0.3 * _fbm(X, Y, _um(40), k + 9, 2)
            dens = 0.12 + 0.88 * clump
            ecm = 0.75 - 0.3 * clump
        return np.asarray(dens, np.float32), np.asarray(ecm, np.float32)


# --------------------------------------------------------------------------- sprites
def _blob(rng, a, b, angle, rough, R=None):
    """Irregular ellipse: returns (alpha in [0,1], radial coordinate r/boundary, yy, xx)."""
    if R is None:
        R = int(np.ceil(max(a, b) * (1 + rough) + 2))
    yy, xx = np.mgrid[-R:R + 1, -R:R + 1].astype(np.float32)
    ca, sa = np.cos(angle), np.sin(angle)
    u = (xx * ca + yy * sa) / a
    v = (-xx * sa + yy * ca) / b
    r = np.sqrt(u * u + v * v)
    phi = np.arctan2(v, u)
    bd = np.ones_like(r)
    for kk in range(2, 6):
        bd += rough * rng.normal(0, 1) / kk * np.cos(kk * phi + rng.uniform(0, 2 * np.pi))
    rho = r / bd
    scale = min(a, b)
    alpha = np.clip((1 - rho) * scale + 0.5, 0, 1)       # ~1 px anti-aliased edge
    return alpha, rho, yy, xx


def _speckle(rng, shape, sigma):
    from scipy.ndimage import gaussian_filter

    s = gaussian_filter(rng.random(shape), sigma)
    return ((s - s.mean()) / (s.std() + 1e-9)).astype(np.float32)


def _make_sprites(rng, nuc_scale):
    """Nucleus sprite banks (haematoxylin density) per class; stroma banks by angle bin."""
    sp = {}
    # tumour: large pleomorphic vesicular nuclei, chromatin rim, 1-2 nucleoli (8-13 um)
    bank = []
    for _ in range(48):
        a = _um(rng.uniform(4.0, 6.5)) * nuc_scale[0]
        b = a / rng.uniform(1.0, 1.5)
        al, rho, yy, xx = _blob(rng, a, b, rng.uniform(0, np.pi), 0.10)
        rim = np.exp(-((1 - rho) * a / 3.0) ** 2)
        val = al * (0.42 + 0.45 * rim + 0.12 * _speckle(rng, al.shape, 1.2))
        for _n in range(rng.integers(1, 3)):
            cy, cx = rng.normal(0, b * 0.25), rng.normal(0, a * 0.25)
            rn = _um(rng.uniform(0.6, 1.0))
            val = np.maximum(val, al * np.clip(rn + 0.5 - np.hypot(yy - cy, xx - cx), 0, 1))
        bank.append(np.clip(val, 0, 1).astype(np.float32))
    sp[0] = bank
    # stroma: spindle nuclei, 12-18 um x 2.5-3.5 um, dense, 16 orientation bins
    banks = []
    for ab in range(16):
        bank = []
        for _ in range(4):
            a = _um(rng.uniform(6.0, 9.0)) * nuc_scale[1]
            b = _um(rng.uniform(1.2, 1.75)) * nuc_scale[1]
            ang = (ab + rng.uniform(-0.5, 0.5)) * np.pi / 16
            al, _, _, _ = _blob(rng, a, b, ang, 0.05)
            bank.append((al * (0.85 + 0.1 * _speckle(rng, al.shape, 1.0))).clip(0, 1)
                        .astype(np.float32))
        banks.append(bank)
    sp[1] = banks
    # lymphoid: small round dark nuclei 5-7 um, clumped chromatin
    bank = []
    for _ in range(32):
        a = _um(rng.uniform(2.5, 3.5)) * nuc_scale[2]
        al, _, _, _ = _blob(rng, a, a * rng.uniform(0.9, 1.0), rng.uniform(0, np.pi), 0.06)
        bank.append((al * (0.9 + 0.15 * _speckle(rng, al.shape, 0.8))).clip(0, 1)
                    .astype(np.float32))
    sp[2] = bank
    # necrosis: karyorrhectic fragments 1-3 um (dark) ...
    bank = []
    for _ in range(32):
        a = _um(rng.uniform(0.5, 1.5)) * nuc_scale[3]
        al, _, _, _ = _blob(rng, a, a / rng.uniform(1.0, 1.8), rng.uniform(0, np.pi), 0.25)
        bank.append((al * rng.uniform(0.7, 1.0)).astype(np.float32))
    sp[3] = bank
    # ... and ghost-cell outlines (faint rings, 7-9 um)
    bank = []
    for _ in range(16):
        a = _um(rng.uniform(3.5, 4.5))
        al, rho, _, _ = _blob(rng, a, a / rng.uniform(1.0, 1.3), rng.uniform(0, np.pi), 0.1)
        ring = np.exp(-((1 - rho) * a / 1.6) ** 2) * (rho < 1.3)
        bank.append((0.3 * ring).astype(np.float32))
    sp[4] = bank
    return sp


# point processes: (sprite bank, spacing um, jitter, class)
_PROCS = [(0, 12.5, 0.8, 0), (1, 16.0, 1.0, 1), (2, 7.5, 0.8, 2), (3, 5.0, 1.0, 3),
          (4, 11.0, 1.0, 3)]


# --------------------------------------------------------------------------- rendering
def _lin_idx(n_out, f, x0, a0):
    c = (np.arange(n_out) + x0 + 0.5) / f - 0.5 - a0
    i0 = np.floor(c).astype(np.intp)
    return i0, (c - i0).astype(np.float32)


def _upsample(a, f, x0, y0, w, h, ax0, ay0):
    """Bilinear (pixel-centre aligned) upsampling of a coarse block whose cell (0, 0) is
    coarse cell (ay0, ax0) of a grid with f px cells, to level-0 pixels of the rect."""
    iy, wy = _lin_idx(h, f, y0, ay0)
    ix, wx = _lin_idx(w, f, x0, ax0)
    t = a[iy] * (1 - wy)[:, None] + a[iy + 1] * wy[:, None]
    return t[:, ix] * (1 - wx) + t[:, ix + 1] * wx


def _grid_block(grid, f_cells, x0, y0, w, h):
    """Block of a full-slide grid (cells of f px) covering the rect with a 1-cell margin,
    clamped at the slide edges; returns (block, ax0, ay0)."""
    n0, n1 = grid.shape
    ay0 = y0 // f_cells - 1
    ax0 = x0 // f_cells - 1
    rows = np.clip(np.arange(ay0, (y0 + h) // f_cells + 1), 0, n0 - 1)
    cols = np.clip(np.arange(ax0, (x0 + w) // f_cells + 1), 0, n1 - 1)
    return grid[np.ix_(rows, cols)], ax0, ay0


def _cls_at(P, X, Y):
    gy = np.clip((np.asarray(Y) // CELL).astype(np.intp), 0, P.cls_grid.shape[0] - 1)
    gx = np.clip((np.asarray(X) // CELL).astype(np.intp), 0, P.cls_grid.shape[1] - 1)
    return P.cls_grid[gy, gx]


def _tile_noise(t, x0, y0, w, h):
    rows = np.arange(y0, y0 + h) % _NOISE
    cols = np.arange(x0, x0 + w) % _NOISE
    return t[rows][:, cols]


def _render_rect(P: SlideModel, x0, y0, w, h):
    """Canonical-stain rendering of a rect.

    Returns (tissue alpha (h, w) uint8 0..255, index (h, w, 3) uint16) where index =
    class * 3 * NB + channel * NB + quantised canonical OD of that channel: the row of the
    per-class rank-transform LUT each pixel reads."""
    # class per pixel (nearest on the 4 um label grid) and soft tissue alpha
    cb, cx0, cy0 = _grid_block(P.cls_grid, CELL, x0, y0, w, h)
    cin = cb[1:-1, 1:-1]

    def per_class(table):  # class constant -> pixel map (classes are constant per cell)
        return np.repeat(np.repeat(table[cin], CELL, 0), CELL, 1)

    tb, _, _ = _grid_block(P.tis_grid, CELL, x0, y0, w, h)
    m = _upsample(tb.astype(np.float32), CELL, x0, y0, w, h, cx0, cy0)
    edge = 4 * m * (1 - m)          # irregular (noisy) only along the tissue border
    m = np.clip((m - 0.5 + 0.3 * edge * _tile_noise(P.n_edge, x0, y0, w, h)) * 3 + 0.5, 0, 1)

    # architecture on a 2 um grid (each coarse point evaluated for its own class only)
    ax0, ay0 = x0 // ARCH - 1, y0 // ARCH - 1
    nx, ny = w // ARCH + 2, h // ARCH + 2
    AX = ((np.arange(nx) + ax0 + 0.5) * ARCH)[None, :].repeat(ny, 0)
    AY = ((np.arange(ny) + ay0 + 0.5) * ARCH)[:, None].repeat(nx, 1)
    acls = _cls_at(P, AX, AY)
    ecm = np.zeros((ny, nx), np.float32)
    for c in range(len(CLASSES)):
        sel = acls == c
        if sel.any():
            ecm[sel] = P.arch(c, AX[sel], AY[sel])[1]
    ecm_px = _upsample(ecm, ARCH, x0, y0, w, h, ax0, ay0)

    # nuclei: stamp sprites from jittered-grid point processes (max compositing)
    M = 48
    H = np.zeros((h + 2 * M, w + 2 * M), np.float32)
    for bank_id, spacing_um, jit, c in _PROCS:
        s = _um(spacing_um * P.cell_scale)
        i0, i1 = int(np.floor((x0 - M) / s)), int(np.floor((x0 + w + M) / s))
        j0, j1 = int(np.floor((y0 - M) / s)), int(np.floor((y0 + h + M) / s))
        ix, iy = np.meshgrid(np.arange(i0, i1 + 1), np.arange(j0, j1 + 1))
        ix, iy = ix.ravel(), iy.ravel()
        kk = P.key + 50_000 * (bank_id + 1)
        px = (ix + 0.5 + jit * (_hash01(ix, iy, kk) - 0.5)) * s
        py = (iy + 0.5 + jit * (_hash01(ix, iy, kk + 1) - 0.5)) * s
        ok = ((px >= x0 - M) & (px < x0 + w + M) & (py >= y0 - M) & (py < y0 + h + M)
              & (px >= 0) & (py >= 0) & (px < P.size) & (py < P.size))
        ok &= _cls_at(P, px, py) == c
        if not ok.any():
            continue
        ix, iy, px, py = ix[ok], iy[ok], px[ok], py[ok]
        dens = P.arch(c, px, py)[0]
        if bank_id == 4:  # ghost cells live where the debris is sparse
            dens = 0.7 * (1 - dens)
        acc = _hash01(ix, iy, kk + 2) < dens
        if not acc.any():
            continue
        ix, iy, px, py = ix[acc], iy[acc], px[acc], py[acc]
        pick = _hash01(ix, iy, kk + 3)
        amp = 0.8 + 0.3 * _hash01(ix, iy, kk + 4)
        if bank_id == 1:  # spindles follow the fibres: orientation from grad(psi)
            e = 4.0
            gx = P.psi(px + e, py) - P.psi(px - e, py)
            gy = P.psi(px, py + e) - P.psi(px, py - e)
            ang = (np.arctan2(gy, gx) + np.pi / 2) % np.pi
            abin = (np.floor(ang / np.pi * 16).astype(int)) % 16
            sprites = [P.sprites[1][a][int(p * 4)] for a, p in zip(abin, pick)]
        else:
            bank = P.sprites[bank_id]
            sprites = [bank[int(p * len(bank))] for p in pick]
        cxs = np.floor(px - x0).astype(int) + M
        cys = np.floor(py - y0).astype(int) + M
        for spr, cxp, cyp, a in zip(sprites, cxs, cys, amp):
            r = spr.shape[0] // 2
            ya, xa = cyp - r, cxp - r
            if ya < 0 or xa < 0 or ya + spr.shape[0] > H.shape[0] or xa + spr.shape[1] > H.shape[1]:
                continue
            view = H[ya:ya + spr.shape[0], xa:xa + spr.shape[1]]
            np.maximum(view, spr * a, out=view)
    H = H[M:M + h, M:M + w]

    # pixel shader: canonical H and E concentrations (in-place ops: big temporaries are slow)
    nf = _tile_noise(P.n_fine, x0, y0, w, h)
    nm = _tile_noise(P.n_mid, x0, y0, w, h)
    nm *= 0.4
    nm += 1
    nm *= per_class(_HBG)
    H += nm                                   # diffuse haematoxylin
    E = per_class(_GAMP * 0.35)
    E *= nf
    E += 1
    E *= ecm_px                               # granular eosin
    # collagen fibres (stroma only; computed on the bounding box of the fibrous cells)
    rows, cols = np.nonzero(_FAMP[cin] > 0)
    if len(rows):
        r0, r1 = rows.min() * CELL, (rows.max() + 1) * CELL
        c0, c1 = cols.min() * CELL, (cols.max() + 1) * CELL
        sub_y = (AY[:, 0] >= y0 + r0 - 2 * ARCH) & (AY[:, 0] < y0 + r1 + 2 * ARCH)
        sub_x = (AX[0] >= x0 + c0 - 2 * ARCH) & (AX[0] < x0 + c1 + 2 * ARCH)
        gy0, gx0 = np.argmax(sub_y), np.argmax(sub_x)
        psi = P.psi(AX[sub_y][:, sub_x], AY[sub_y][:, sub_x]).astype(np.float64)
        p0 = psi[0, 0]
        psi_px = _upsample((psi - p0).astype(np.float32), ARCH, x0 + c0, y0 + r0,
                           c1 - c0, r1 - r0, ax0 + gx0, ay0 + gy0)
        ph = (2 * np.pi / P.fibre_lambda)
        psi_px *= ph
        psi_px += np.float32((p0 * ph) % (2 * np.pi))
        psi_px += 1.5 * _tile_noise(P.n_edge, x0 + c0 + 97, y0 + r0 + 53, c1 - c0, r1 - r0)
        fib = np.sin(psi_px, out=psi_px)      # in [-1, 1]
        fa = per_class(_FAMP)[r0:r1, c0:c1]
        fib *= 0.5 * fa
        fib += 1 - 0.5 * fa                   # 1 - fa + fa * (0.5 + 0.5 sin)
        E[r0:r1, c0:c1] *= fib
    t = np.minimum(H, 1)
    t *= -0.45
    t += 1
    E *= t                                    # nuclei displace cytoplasm
    np.maximum(E, 0, out=E)
    np.maximum(H, 0, out=H)
    # canonical OD per channel, quantised, offset to the class's LUT row
    off = per_class((np.arange(len(CLASSES)) * 3 * NB).astype(np.uint16))
    q = np.empty((h, w, 3), np.uint16)
    sc = NB / ODMAX
    for ch in range(3):
        t = H * np.float32(1.1 * _VH[ch] * sc)
        t += E * np.float32(0.8 * _VE[ch] * sc)
        t += np.float32(0.03 * sc)
        np.minimum(t, NB - 1, out=t)
        qc = t.astype(np.uint16)
        qc += off
        qc += ch * NB
        q[..., ch] = qc
    m *= 255
    m += 0.5
    return m.astype(np.uint8), q


def tile_bands(size):
    cw = min(size, 2048)
    for y0 in range(0, size, TILE):
        yield y0, [(x0, min(cw, size - x0)) for x0 in range(0, size, cw)]


def calibrate(P: SlideModel, keep: bool):
    """First pass: per-class per-channel OD histograms of tissue pixels, then LUTs that map
    each class's distribution exactly onto the shared reference (the barycentre of the
    classes' quantile functions). With `keep`, the rendered indices are kept for pass 2."""
    C = len(CLASSES)
    bands = list(tile_bands(P.size))
    if not keep and len(bands) > 24:  # large slides: a spread subset of tile rows
        idx = np.linspace(0, len(bands) - 1, 24).round().astype(int)
        bands = [bands[i] for i in idx]
    hist = np.zeros(C * 3 * NB, np.float64)
    cache = {}
    for y0, cols in bands:
        for x0, w in cols:
            m, q = _render_rect(P, x0, y0, w, TILE)
            hist += np.bincount(q[m > 127].ravel(), minlength=C * 3 * NB)
            if keep:
                cache[x0, y0] = (m, q)
    hist = hist.reshape(C, 3, NB)
    probs = (np.arange(NB) + 0.5) / NB
    edges = np.arange(NB + 1) * (ODMAX / NB)
    pooled = hist.sum(0)
    present = hist[:, 0].sum(1) > 1000
    cdfs = np.zeros((C, 3, NB + 1))
    for c in range(C):
        for ch in range(3):
            hh = hist[c, ch] if present[c] else pooled[ch]
            cdfs[c, ch, 1:] = np.cumsum(hh) / max(hh.sum(), 1)
    # quantile functions (piecewise linear within bins), reference = their mean
    quant = np.zeros((C, 3, NB))
    for c in range(C):
        for ch in range(3):
            cdf = cdfs[c, ch]
            keep_i = np.concatenate([[True], np.diff(cdf) > 0])
            quant[c, ch] = np.interp(probs, cdf[keep_i], edges[keep_i])
    ref = quant[present].mean(0) if present.any() else quant.mean(0)
    lut = np.zeros((C, 3, NB), np.float32)
    for c in range(C):
        for ch in range(3):
            cmid = 0.5 * (cdfs[c, ch, 1:] + cdfs[c, ch, :-1])   # mid-rank of each bin
            lut[c, ch] = np.interp(cmid, probs, ref[ch])
    return lut, (cache if keep else None)


def render_rgb(P: SlideModel, lut, x0, y0, w, h, cached=None):
    m, q = cached if cached is not None else _render_rect(P, x0, y0, w, h)
    od = np.take(lut.reshape(-1), q)                       # rank-transformed canonical OD
    od = od @ P.stain_mix                                  # per-slide stain variation
    nm = _tile_noise(P.n_mid, x0 + 211, y0 + 17, w, h)
    bg = nm[..., None] * np.float32(0.006) + P.bg_od       # background OD
    od -= bg
    od *= (m * np.float32(1 / 255))[..., None]
    od += bg
    np.maximum(od, 0, out=od)
    od *= -1
    np.exp(od, out=od)
    od *= 255
    od += 0.5
    return od.astype(np.uint8)


def label_polygons(P: SlideModel):
    """Per class: a shapely (Multi)Polygon in level-0 px, exactly the label grid cells."""
    import shapely

    lab = np.where(P.tis_grid, P.cls_grid.astype(np.int16) + 1, 0)
    out = {}
    for c, name in enumerate(CLASSES):
        mk = lab == c + 1
        if not mk.any():
            continue
        pad = np.zeros((mk.shape[0], mk.shape[1] + 2), np.int8)
        pad[:, 1:-1] = mk
        d = np.diff(pad, axis=1)
        rs, xs = np.nonzero(d == 1)
        re, xe = np.nonzero(d == -1)   # same row order as starts
        boxes = shapely.box(xs * CELL, rs * CELL, xe * CELL, (re + 1) * CELL)
        geom = shapely.union_all(boxes)
        out[name] = shapely.normalize(geom)
    return out
