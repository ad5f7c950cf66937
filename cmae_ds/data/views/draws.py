"""Every random decision of docs/spec.md section 7, from uniforms keyed by (seed, epoch, dataset index), shared by both
pipelines: the torch pipeline uses them in its workers, the DALI pipeline feeds them to its graph.
So a sample's views do not depend on the worker, the batch it landed in or where a run resumed, and the two
pipelines take the same random decisions for a sample (how each carries out its color ops still differs).

The random-resized-crop box depends on the image size, which the DALI graph only learns inside the graph: the
draws are size-free (ten candidate (area, aspect) pairs and two position fractions) and `rrc_box` turns them into a
box in float32 with the exact operation sequence the DALI graph uses (dali_graphs.rrc_box), so both agree to the
pixel.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from . import recipe as C

ATTEMPTS = 10  # torchvision RandomResizedCrop.get_params


@dataclass
class ViewDraws:
    """One sample's random decisions, independent of its image size."""

    scale: np.ndarray  # (ATTEMPTS,) float32 area fractions
    aspect: np.ndarray  # (ATTEMPTS,) float32 width / height, log-uniform
    u_top: np.float32  # position of the box in the free range, [0, 1)
    u_left: np.float32
    flip: bool
    dy: int
    dx: int
    jitter: bool
    factors: tuple[float, float, float, float]  # brightness, contrast, saturation, hue (fraction of a turn)
    order: tuple[int, ...]  # torchvision ColorJitter applies its four ops in random order
    gray: bool
    blur: bool
    sigma: float

    def debug(self) -> dict:
        return dict(
            flip=self.flip,
            dy=self.dy,
            dx=self.dx,
            jitter=self.jitter,
            gray=self.gray,
            blur=self.blur,
            sigma=self.sigma if self.blur else 0.0,
        )


_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
UNIFORMS = 2 * ATTEMPTS + 17  # per sample


def _mix(x: np.ndarray) -> np.ndarray:
    """SplitMix64's output function (a bijective 64-bit mixer), elementwise on uint64."""
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def uniforms(seed: int, epoch: int, indices, n: int = UNIFORMS) -> np.ndarray:
    """(len(indices), n) float64 uniforms in [0, 1): position index * 64 + j of a SplitMix64 stream keyed by
    (seed, epoch). Counter-based, so a whole batch is a few array operations (the DALI feed runs in the training
    process) and every sample's numbers depend on nothing but its keys."""
    with np.errstate(over='ignore'):
        key = _mix(np.array([seed & (2**64 - 1)], dtype=np.uint64) + _GOLDEN)
        key = _mix(key + np.uint64(epoch & (2**64 - 1)) * _GOLDEN)
        ctr = np.asarray(indices, dtype=np.uint64)[:, None] * np.uint64(64) + np.arange(n, dtype=np.uint64)
        x = _mix(key + (ctr + np.uint64(1)) * _GOLDEN)
    return (x >> np.uint64(11)).astype(np.float64) * 2.0**-53


def draw_batch(seed: int, epoch: int, indices, extra: int, scale=C.MASTER_SCALE, ratio=C.RATIO) -> dict:
    """Every decision of docs/spec.md section 7 for a batch of dataset indices, as arrays with the batch first."""
    u, k = uniforms(seed, epoch, indices), ATTEMPTS
    lo, hi = math.log(ratio[0]), math.log(ratio[1])
    v = u[:, 2 * k :]
    amount = np.array([C.BRIGHTNESS, C.CONTRAST, C.SATURATION])
    return dict(
        scale=(scale[0] + (scale[1] - scale[0]) * u[:, :k]).astype(np.float32),
        aspect=np.exp(lo + (hi - lo) * u[:, k : 2 * k]).astype(np.float32),
        u_top=v[:, 0].astype(np.float32),
        u_left=v[:, 1].astype(np.float32),
        flip=v[:, 2] < 0.5,
        # uniform in [0, extra - 1]; with no margin (MAE's view) the target window is the master itself
        dy=np.minimum((v[:, 3] * extra).astype(np.int32), max(extra - 1, 0)),
        dx=np.minimum((v[:, 4] * extra).astype(np.int32), max(extra - 1, 0)),
        factors=np.concatenate([1 - amount + 2 * amount * v[:, 5:8], -C.HUE + 2 * C.HUE * v[:, 8:9]], 1),
        order=np.argsort(v[:, 9:13], axis=1),  # a uniform random permutation per sample
        jitter=v[:, 13] < C.JITTER_P,
        gray=v[:, 14] < C.GRAY_P,
        blur=v[:, 15] < C.BLUR_P,
        sigma=C.BLUR_SIGMA[0] + (C.BLUR_SIGMA[1] - C.BLUR_SIGMA[0]) * v[:, 16],
    )


def draw_views(seed: int, epoch: int, index: int, extra: int, scale=C.MASTER_SCALE) -> ViewDraws:
    """One sample's draws (row 0 of draw_batch), for the torch pipeline's workers."""
    return row(draw_batch(seed, epoch, [index], extra, scale), 0)


def row(batch: dict, i: int) -> ViewDraws:
    """Sample i of draw_batch's arrays."""
    d = {key: val[i] for key, val in batch.items()}
    return ViewDraws(
        d['scale'],
        d['aspect'],
        d['u_top'],
        d['u_left'],
        bool(d['flip']),
        int(d['dy']),
        int(d['dx']),
        bool(d['jitter']),
        tuple(float(f) for f in d['factors']),
        tuple(int(i) for i in d['order']),
        bool(d['gray']),
        bool(d['blur']),
        float(d['sigma']),
    )


def _round(x: np.ndarray) -> np.ndarray:
    return np.floor(x + np.float32(0.5))


def rrc_box(d: ViewDraws, width: int, height: int, ratio=C.RATIO) -> tuple[int, int, int, int]:
    """-> (top, left, h, w) of one sample: rrc_boxes for a batch of one."""
    box = rrc_boxes(d.scale[None], d.aspect[None], np.array([d.u_top]), np.array([d.u_left]), [width], [height], ratio)[
        0
    ]
    return tuple(int(v) for v in box)


def rrc_boxes(scale, aspect, u_top, u_left, widths, heights, ratio=C.RATIO) -> np.ndarray:
    """-> (N, 4) int64 (top, left, h, w): per sample the first candidate that fits (torchvision's rule), else the
    central crop at the nearest allowed aspect ratio. float32 throughout, in the DALI graph's order of operations,
    elementwise over the batch (the same IEEE operations as one sample at a time)."""
    f32 = np.float32
    W, H = np.asarray(widths, dtype=f32), np.asarray(heights, dtype=f32)
    ta = (H * W)[:, None] * scale
    w, h = _round(np.sqrt(ta * aspect)), _round(np.sqrt(ta / aspect))
    ok = (w <= W[:, None]) & (h <= H[:, None]) & (w > 0) & (h > 0)
    pick = np.arange(len(W)), np.argmax(ok, axis=1)
    w, h = w[pick], h[pick]
    top = np.minimum(np.floor(np.asarray(u_top, dtype=f32) * (H - h + f32(1))), H - h)
    left = np.minimum(np.floor(np.asarray(u_left, dtype=f32) * (W - w + f32(1))), W - w)
    in_ratio = W / H
    narrow, wide = in_ratio < f32(ratio[0]), in_ratio > f32(ratio[1])
    cw = np.where(wide, _round(H * f32(ratio[1])), W)
    ch = np.where(narrow, _round(W / f32(ratio[0])), H)
    found = ok.any(axis=1)
    box = [
        np.where(found, top, np.floor((H - ch) / f32(2))),
        np.where(found, left, np.floor((W - cw) / f32(2))),
        np.where(found, h, ch),
        np.where(found, w, cw),
    ]
    return np.stack(box, axis=1).astype(np.int64)


CLS_COLUMNS = ('scale', 'aspect', 'u_top', 'u_left', 'flip')
"""What the DALI classification training graphs take: the crop box draws and the flip."""

DALI_COLUMNS = (
    'scale',
    'aspect',
    'u_top',
    'u_left',
    'flip',
    'dy',
    'dx',
    'jitter',
    'gray',
    'brightness',
    'contrast',
    'saturation',
    'hue',
    'blur',
    'sigma',
)
"""What the DALI pretraining graph takes from its external source, one array per entry, in this order."""


def dali_columns(d: dict) -> tuple:
    """draw_batch's arrays -> one array per DALI_COLUMNS entry. Jitter and grayscale become color_twist's four
    factors here (identity where not drawn; saturation 0 for grayscale; hue in degrees)."""
    f32 = np.float32
    fac = np.where(d['jitter'][:, None], d['factors'], np.array([1.0, 1.0, 1.0, 0.0])).astype(f32)
    return (
        d['scale'],
        d['aspect'],
        d['u_top'],
        d['u_left'],
        d['flip'],
        d['dy'],
        d['dx'],
        d['jitter'],
        d['gray'],
        fac[:, 0].copy(),
        fac[:, 1].copy(),
        fac[:, 2] * ~d['gray'],
        fac[:, 3] * f32(360),
        d['blur'],
        d['sigma'].astype(f32),
    )


def cls_columns(d: dict) -> tuple:
    """draw_batch's arrays (drawn with the classification scale) -> one array per CLS_COLUMNS entry."""
    return tuple(d[k] for k in CLS_COLUMNS)
