"""Native-resolution augmentation of tile batches, and the input normalisation that training
and embedding share (ImageNet statistics, or per-tile standardisation)."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# HED colour deconvolution (Ruifrok & Johnston, as in scikit-image)
_RGB_FROM_HED = np.array([[0.65, 0.70, 0.29], [0.07, 0.99, 0.11], [0.27, 0.57, 0.78]])
_RGB_FROM_HED[2, :] = np.cross(_RGB_FROM_HED[0, :], _RGB_FROM_HED[1, :])
_HED_FROM_RGB = np.linalg.inv(_RGB_FROM_HED)


@dataclass
class Augmenter:
    """Native-resolution augmentations (no resized crops): flips, 90-degree rotations,
    HED stain jitter, brightness/contrast/saturation jitter, light Gaussian blur, then
    ImageNet normalisation. All randomness comes from the numpy ``rng`` passed in.

    Batched implementation (one pass per operation over the whole batch, in place on a
    private copy; the input tensor is never modified): the HED jitter
    ``exp(-(((-log x) @ H) * a + b) @ R)`` is one per-image 3x3 colour matrix
    ``M = H diag(a) R`` and offset ``c = b R`` applied with one batched matmul,
    ``exp(log(x) @ M - c)``; the blur convolves only the views drawn for it, in one
    grouped convolution."""

    hed_jitter: float = 0.05
    color_jitter: float = 0.1
    blur_prob: float = 0.1
    blur_sigma: tuple = (0.1, 1.0)
    enabled: bool = True
    tile_norm: bool = False
    mean: tuple = IMAGENET_MEAN
    std: tuple = IMAGENET_STD
    _hed: torch.Tensor = field(default=None, init=False, repr=False)
    _rgb: torch.Tensor = field(default=None, init=False, repr=False)
    _consts: dict = field(default_factory=dict, init=False, repr=False, compare=False)

    def __post_init__(self):
        self._hed = torch.tensor(_HED_FROM_RGB, dtype=torch.float32)
        self._rgb = torch.tensor(_RGB_FROM_HED, dtype=torch.float32)

    def _mean_std(self, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        key = (dtype, tuple(self.mean), tuple(self.std))
        ms = self._consts.get(key)
        if ms is None:
            ms = self._consts[key] = (torch.tensor(self.mean, dtype=dtype).view(1, 3, 1, 1),
                                      torch.tensor(self.std, dtype=dtype).view(1, 3, 1, 1))
        return ms

    def normalise(self, x: torch.Tensor) -> torch.Tensor:
        return normalise(x, self.tile_norm)

    @staticmethod
    def _geometry(x: torch.Tensor, flip_h, flip_v, rot) -> torch.Tensor:
        """Per-view flip (W), flip (H), then rot90 by ``rot`` quarter turns; a new tensor.
        Views with the same (flip_h, flip_v, rot) are transformed together."""
        out = torch.empty_like(x, memory_format=torch.contiguous_format)
        code = flip_h.astype(np.int64) * 8 + flip_v.astype(np.int64) * 4 + rot.astype(np.int64)
        for c in np.unique(code):
            sel = np.flatnonzero(code == c)
            fh, fv, r = bool(c & 8), bool(c & 4), int(c & 3)
            whole = len(sel) == x.shape[0]
            t = x if whole else x[torch.from_numpy(sel)]
            if fh and fv:
                t = t.flip(-2, -1)
            elif fh:
                t = t.flip(-1)
            elif fv:
                t = t.flip(-2)
            if r:
                t = torch.rot90(t, r, dims=(-2, -1))
            if whole:
                out.copy_(t)
            else:
                out[torch.from_numpy(sel)] = t
        return out

    def __call__(self, x: torch.Tensor, rng: np.random.Generator) -> torch.Tensor:
        """x: float [N, 3, T, T] in [0, 1] -> augmented and normalised."""
        if not self.enabled:
            return self.normalise(x)
        N = x.shape[0]
        flip_h = rng.random(N) < 0.5
        flip_v = rng.random(N) < 0.5
        rot = rng.integers(0, 4, size=N)
        hed_a = rng.uniform(1 - self.hed_jitter, 1 + self.hed_jitter, size=(N, 3))
        hed_b = rng.uniform(-self.hed_jitter, self.hed_jitter, size=(N, 3))
        cj = self.color_jitter
        bri = rng.uniform(1 - cj, 1 + cj, size=N)
        con = rng.uniform(1 - cj, 1 + cj, size=N)
        sat = rng.uniform(1 - cj, 1 + cj, size=N)
        blur = rng.random(N) < self.blur_prob
        sig = rng.uniform(self.blur_sigma[0], self.blur_sigma[1], size=N)
        if N == 0:
            return self.normalise(x)

        # geometry (exact pixel permutations); x is now our own contiguous copy
        x = self._geometry(x, flip_h, flip_v, rot)
        dt = x.dtype
        H, W = x.shape[-2:]
        flat = x.view(N, 3, H * W)

        # HED stain jitter in optical density space, as one colour matrix per view
        if self.hed_jitter > 0:
            # od' = ((od @ Hm) * a + b) @ R = od @ (Hm diag(a) R) + b @ R, od = -log x
            M = np.einsum("cd,nd,de->nce", _HED_FROM_RGB, hed_a, _RGB_FROM_HED)   # [N, in, out]
            c = hed_b @ _RGB_FROM_HED                                             # [N, out]
            Mt = torch.as_tensor(M.transpose(0, 2, 1), dtype=dt).contiguous()     # [N, out, in]
            negc = torch.as_tensor(-c, dtype=dt).view(N, 3, 1).expand(N, 3, H * W)
            flat.clamp_(1.0 / 255.0, 1.0).log_()
            flat = torch.baddbmm(negc, Mt, flat)   # log of the jittered image
            flat.exp_().clamp_(0.0, 1.0)

        # brightness / contrast / saturation
        if cj > 0:
            w = torch.tensor([[0.299, 0.587, 0.114]], dtype=dt)
            bri_t = torch.as_tensor(bri, dtype=dt).view(N, 1, 1)
            con_t = torch.as_tensor(con, dtype=dt).view(N, 1, 1)
            sat_t = torch.as_tensor(sat, dtype=dt).view(N, 1, 1)
            flat.mul_(bri_t).clamp_(0.0, 1.0)
            gray = torch.matmul(w, flat)                                   # [N, 1, HW]
            m = gray.mean(dim=2, keepdim=True)                             # [N, 1, 1]
            # m + (x - m) * con
            flat.mul_(con_t).add_(m * (1 - con_t)).clamp_(0.0, 1.0)
            gray = torch.matmul(w, flat)
            # gray + (x - gray) * sat
            flat.mul_(sat_t).add_(gray * (1 - sat_t)).clamp_(0.0, 1.0)
        x = flat.view(N, 3, H, W)

        # light blur on a few views: one grouped 3x3 convolution over those views only
        sel = np.flatnonzero(blur)
        if len(sel):
            s = sig[sel].astype(np.float64)
            r = np.arange(-1, 2, dtype=np.float64)
            k1 = np.exp(-(r[None, :] ** 2) / (2 * s[:, None] ** 2))
            k1 /= k1.sum(axis=1, keepdims=True)
            k2 = torch.as_tensor(k1[:, :, None] * k1[:, None, :], dtype=dt)      # [n, 3, 3]
            k2 = k2.repeat_interleave(3, dim=0).unsqueeze(1)                     # [3n, 1, 3, 3]
            idx = torch.from_numpy(sel)
            t = F.pad(x[idx].reshape(1, 3 * len(sel), H, W), (1, 1, 1, 1), mode="reflect")
            x[idx] = F.conv2d(t, k2, groups=3 * len(sel)).view(len(sel), 3, H, W)

        if self.tile_norm:
            return tile_standardise(x)
        mean, std = self._mean_std(dt)
        return x.sub_(mean).div_(std)


def tile_standardise(x: torch.Tensor) -> torch.Tensor:
    """Per-tile, per-channel standardisation of [N, 3, T, T] images: removes each tile's
    colour mean and spread (slide stain, and the colour-statistics shortcut), leaving
    structure. The same function serves training and embedding (encoder meta `tile_norm`)."""
    mean = x.mean(dim=(-2, -1), keepdim=True)
    std = x.std(dim=(-2, -1), keepdim=True).clamp_min(1e-2)
    return (x - mean) / std


def normalise(x: torch.Tensor, tile_norm: bool) -> torch.Tensor:
    """The network's input normalisation of float [N, 3, T, T] images in [0, 1], the same in
    training and embedding: per-tile standardisation, or ImageNet mean and std."""
    if tile_norm:
        return tile_standardise(x)
    mean = torch.tensor(IMAGENET_MEAN, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    return (x - mean) / std


def pixels_to_input(pixels: np.ndarray, tile_norm: bool, device="cpu") -> torch.Tensor:
    """uint8 tiles [N, T, T, 3] as read from a slide -> the network's normalised input."""
    x = torch.from_numpy(pixels).to(device).permute(0, 3, 1, 2).float().div_(255)
    return normalise(x, tile_norm)
