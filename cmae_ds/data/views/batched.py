"""Spec section 7 (and the section 9 classification transforms) as batched tensor ops on decoded images, on any
device: the torch_gpu pipeline runs them on CUDA, the test suite on CPU tensors.

Every random decision comes from draws.py (the arrays of draw_batch, batch first), so a sample is cropped, flipped
and shifted exactly as by the torch and DALI pipelines. Images enter as a list of uint8 (3, H, W) tensors (sizes
differ); after the crop-resize everything is master-sized and the rest works on one (N, 3, M, M) float tensor in
0-255 units, rounded after each op the way the uint8 pipelines quantize. A batch costs a number of operators that
does not grow with its size (about 200 for the pretraining views: tests/measure_data_ops.py): the crops are
resized and flipped by two batched matmuls, the target windows cut by one gather, colour jitter is one blend per
step plus the hue. Per-sample selections (who is jittered, blurred, ...) are built from the draws on the host and
queued to the device from pinned memory (upload.py), so nothing here waits on the device; the exceptions are
torchvision's RandAugment (fine-tuning: its affine ops build their matrices with blocking copies) and, in the
evaluation resize only, a crop too large for the CUDA interpolate kernel (_bicubic_aa).
"""

from __future__ import annotations

import math
import warnings
from collections import defaultdict

import numpy as np
import torch
import torch.nn.functional as F

from . import recipe as C
from .draws import rrc_boxes
from .normalize import normalize
from .upload import constant, upload

LUMA = (0.299, 0.587, 0.114)  # PIL's 'L' conversion (the torch pipeline's grayscale and contrast mean)
BLUR_RADIUS = int(np.ceil(3 * C.BLUR_SIGMA[1]))  # 3 sigma of the largest sigma: a 13-tap kernel


def boxes_of(d: dict, imgs: list[torch.Tensor]) -> list[tuple[int, int, int, int]]:
    """(top, left, h, w) per sample: the draws' box on the decoded image's size, as both other pipelines do."""
    sizes = np.array([img.shape[-2:] for img in imgs], dtype=np.int64).reshape(-1, 2)
    boxes = rrc_boxes(d['scale'], d['aspect'], d['u_top'], d['u_left'], sizes[:, 1], sizes[:, 0])
    return [tuple(b) for b in boxes.tolist()]


def resize_all(crops: list[torch.Tensor], sizes: list[tuple[int, int]], out: torch.Tensor | None = None) -> list:
    """Bicubic antialiased resize of uint8 (3, h, w) crops to their (oh, ow) -> float (3, oh, ow) in 0-255, rounded
    and clamped like a uint8 image (written into out[i] when given). Crops of equal shape and target share one
    interpolate call."""
    groups = defaultdict(list)
    for i, (c, s) in enumerate(zip(crops, sizes)):
        groups[(tuple(c.shape), tuple(s))].append(i)
    res: list = [None] * len(crops)
    for (_, size), idx in groups.items():
        x = torch.stack([crops[i] for i in idx]).float()
        y = _bicubic_aa(x, size)
        for i, t in zip(idx, y.clamp_(0, 255).round_()):
            if out is not None:
                out[i] = t
            res[i] = t if out is None else out[i]
    return res


def cuda_resize_fits(in_hw, out_hw, shared_mem_per_block: int, warp: int = 32) -> bool:
    """Whether torch's CUDA antialiased bicubic kernel takes a float32 resize of in_hw to out_hw. Its block of
    (warp, block_y) threads keeps warp x taps_w + block_y x taps_h x (warp + 1) floats in shared memory, with
    taps = 1 + 2 ceil(2 x in/out) on a downscale, and fails when even block_y = 1 does not fit ("Too much shared
    memory required": upsample_gen2d_aa_out_cuda_template in aten/src/ATen/native/cuda/UpSampleBilinear2d.cu).
    With 48 KiB per block that is a downscale of more than 47x along both axes."""

    def taps(n_in: int, n_out: int) -> int:
        scale = float(np.float32(n_in) / np.float32(n_out))  # area_pixel_compute_scale in float32
        return 1 + 2 * math.ceil(2.0 * scale if scale >= 1.0 else 2.0)

    th, tw = taps(in_hw[0], out_hw[0]), taps(in_hw[1], out_hw[1])
    return warp * tw + th * (warp + 1) <= shared_mem_per_block // 4


def needs_host_resize(in_hw, out_hw, device: torch.device, shared_mem_per_block: int | None = None, warp=32) -> bool:
    """True for a CUDA resize its kernel cannot take (cuda_resize_fits): that crop is resized on the CPU."""
    if device.type != 'cuda':
        return False
    if shared_mem_per_block is None:
        props = torch.cuda.get_device_properties(device)
        shared_mem_per_block, warp = props.shared_memory_per_block, props.warp_size
    return not cuda_resize_fits(in_hw, out_hw, shared_mem_per_block, warp)


def _bicubic_aa(x: torch.Tensor, size) -> torch.Tensor:
    """(n, 3, h, w) float -> (n, 3, *size), antialiased bicubic. A crop too large for the CUDA kernel (a very large
    image, rare) takes the CPU path's own arithmetic and comes back: both paths give the same view, at the cost of
    two blocking copies for that crop only."""
    if needs_host_resize(tuple(x.shape[-2:]), tuple(size), x.device):
        warnings.warn(
            f'torch_gpu: a {tuple(x.shape[-2:])} crop resized to {tuple(size)} is beyond the CUDA kernel '
            '(shared memory); resized on the CPU',
            stacklevel=3,
        )
        return _bicubic_aa(x.cpu(), size).to(x.device)
    return F.interpolate(x, size=size, mode='bicubic', antialias=True, align_corners=False)


def aa_weights(n_in: int, n_out: int) -> np.ndarray:
    """(n_out, n_in) float32: row i holds the taps of torch's antialiased bicubic resize for output pixel i (Keys'
    cubic with a = -0.5, support widened by the downscale factor, taps normalized to sum 1), as
    _compute_indices_min_size_weights_aa computes them (aten/src/ATen/native/UpSample.h)."""
    scale = float(np.float32(n_in) / np.float32(n_out))  # area_pixel_compute_scale in float32
    support, inv = (2.0 * scale, 1.0 / scale) if scale >= 1.0 else (2.0, 1.0)
    center = scale * (np.arange(n_out) + 0.5)
    lo = np.maximum(np.trunc(center - support + 0.5).astype(np.int64), 0)
    hi = np.minimum(np.trunc(center + support + 0.5).astype(np.int64), n_in)
    j = np.arange(n_in)
    x = np.abs((j[None] - center[:, None] + 0.5) * inv)
    a = -0.5
    near, far = ((a + 2) * x - (a + 3)) * x * x + 1, ((a * x - 5 * a) * x + 8 * a) * x - 4 * a
    w = np.where(x < 1, near, np.where(x < 2, far, 0.0))
    w = np.where((j[None] >= lo[:, None]) & (j[None] < hi[:, None]), w, 0.0)
    return (w / w.sum(1, keepdims=True)).astype(np.float32)


def _resize_matrices(boxes, size: int, flip: np.ndarray | None, rows: int, cols: int) -> tuple[np.ndarray, ...]:
    """Per sample, the resize of its crop (h, w) to size x size as two matrices, zero-padded to the batch's
    largest crop: Wy (N, size, rows), Wx^T (N, cols, size); a flip reverses Wx's output order."""
    wy = np.zeros((len(boxes), size, rows), np.float32)
    wxt = np.zeros((len(boxes), cols, size), np.float32)
    for n, (_, _, h, w) in enumerate(boxes):
        wy[n, :, :h] = aa_weights(h, size)
        wx = aa_weights(w, size)
        wxt[n, :w] = (wx[::-1] if flip is not None and flip[n] else wx).T
    return wy, wxt


def _flat(img: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int, int]]:
    """uint8 (3, H, W) -> its values in memory order (a view, no copy, for the planar layout of nvJPEG and the
    workers and the interleaved one of the CPU decoder) and the (channel, row, column) strides into them."""
    h, w = img.shape[-2:]
    if img.is_contiguous():
        return img.reshape(-1), (h * w, w, 1)
    hwc = img.permute(1, 2, 0)
    if hwc.is_contiguous():
        return hwc.reshape(-1), (1, 3 * w, 3)
    return img.contiguous().reshape(-1), (h * w, w, 1)


def _gather_crops(imgs: list[torch.Tensor], boxes, rows: int, cols: int) -> torch.Tensor:
    """The crops of a batch as one uint8 (N, 3, rows, cols) tensor, padded by repeating each crop's last row and
    column (their weights are 0): one concatenation and one gather, whatever the number of images."""
    dev = imgs[0].device
    flats, strides = zip(*(_flat(img) for img in imgs))
    box = np.asarray(boxes, np.int64).reshape(-1, 4)
    start = np.concatenate([[0], np.cumsum([f.numel() for f in flats])[:-1]]).astype(np.int64)
    per = upload(np.concatenate([start[:, None], np.asarray(strides, np.int64), box], 1), dev)
    start, sc, sy, sx, top, left, h, w = (per[:, k].view(-1, 1) for k in range(8))
    y = torch.minimum(torch.arange(rows, device=dev).view(1, -1), h - 1) + top  # (N, rows)
    x = torch.minimum(torch.arange(cols, device=dev).view(1, -1), w - 1) + left  # (N, cols)
    channel = torch.arange(3, device=dev).view(1, 3, 1, 1) * sc.view(-1, 1, 1, 1)
    idx = start.view(-1, 1, 1, 1) + channel + (y * sy).view(-1, 1, rows, 1) + (x * sx).view(-1, 1, 1, cols)
    return torch.cat(flats)[idx]


def crop_resize(imgs: list[torch.Tensor], boxes, size: int, flip: np.ndarray | None = None) -> torch.Tensor:
    """Random-resized-crop (and the horizontal flip where `flip` says) of a whole batch -> float (N, 3, size, size)
    in 0-255, rounded and clamped like a uint8 image. The antialiased bicubic resize is separable, so each crop's
    resize is Wy @ crop @ Wx^T: two batched matmuls over the padded crops instead of one interpolate per crop
    (the crops differ in shape). A batch is split where padding to its largest crop would exceed CHUNK values."""
    parts = _chunks(boxes)
    if len(parts) == 1:
        return _crop_resize(imgs, boxes, size, flip)
    out = torch.empty((len(imgs), 3, size, size), device=imgs[0].device)
    for idx in parts:
        sub = _crop_resize([imgs[i] for i in idx], [boxes[i] for i in idx], size, None if flip is None else flip[idx])
        out[upload(idx, out.device)] = sub
    return out


def _crop_resize(imgs: list[torch.Tensor], boxes, size: int, flip: np.ndarray | None) -> torch.Tensor:
    rows, cols = max(b[2] for b in boxes), max(b[3] for b in boxes)
    wy, wxt = _resize_matrices(boxes, size, flip, rows, cols)
    crops, dev = _gather_crops(imgs, boxes, rows, cols).float(), imgs[0].device
    y = upload(wy, dev).unsqueeze(1) @ (crops @ upload(wxt, dev).unsqueeze(1))  # horizontal pass first, as torch
    return y.clamp_(0, 255).round_()


CHUNK = 1 << 26  # padded crop values per matmul batch (256 MB in fp32): bounds memory when one image is huge


def _chunks(boxes) -> list[np.ndarray]:
    """Sample indices in groups whose padded crops stay under CHUNK values, similar sizes together."""
    order = np.argsort([h * w for _, _, h, w in boxes], kind='stable')
    parts, start, mh, mw = [], 0, 0, 0
    for k, i in enumerate(order):
        h, w = boxes[i][2], boxes[i][3]
        if k > start and (k + 1 - start) * 3 * max(mh, h) * max(mw, w) > CHUNK:
            parts.append(order[start:k])
            start, mh, mw = k, 0, 0
        mh, mw = max(mh, h), max(mw, w)
    parts.append(order[start:])
    return parts if len(parts) > 1 else [np.arange(len(boxes))]


def _rows(mask: np.ndarray, device) -> torch.Tensor | None:
    idx = np.flatnonzero(mask)
    return upload(idx, device) if len(idx) else None


def windows(master: torch.Tensor, dy: np.ndarray, dx: np.ndarray, size: int) -> torch.Tensor:
    """(N, 3, M, M) -> (N, 3, size, size): sample n's window at (dy[n], dx[n]), one gather for the batch."""
    n, dev = master.shape[0], master.device
    step = torch.arange(size, device=dev)
    y = upload(dy, dev).view(-1, 1) + step  # (N, size)
    x = upload(dx, dev).view(-1, 1) + step
    rows = torch.arange(n, device=dev).view(-1, 1, 1, 1)
    return master[rows, torch.arange(3, device=dev).view(1, 3, 1, 1), y.view(n, 1, size, 1), x.view(n, 1, 1, size)]


def luma(x: torch.Tensor) -> torch.Tensor:
    """(N, 3, H, W) -> (N, 1, H, W)."""
    w = constant(LUMA, x.device, x.dtype).view(1, 3, 1, 1)
    return (x * w).sum(1, keepdim=True)


def hue(x: torch.Tensor, f: torch.Tensor) -> torch.Tensor:
    """torchvision's adjust_hue (RGB -> HSV, hue + f mod 1, back) on 0-255 values, in closed form, about 20 ops:
    with the largest channel m (r before g before b on ties, as torchvision's maxc == r tests), the spread
    cr = max - min and the hue in sixths h6 = (next - next-but-one) / cr + 2 m, channel c comes back as
    max - cr clamp(min(k, 4 - k), 0, 1) with k = (n_c + h6 + 6 f) mod 6, n = (5, 3, 1) (the six-sector table;
    v s = cr). An achromatic pixel (cr = 0) keeps its value."""
    top, m = x.max(1, keepdim=True)  # the first maximal channel on ties
    cr = top - x.amin(1, keepdim=True)
    nxt = x.roll(-1, 1) - x.roll(-2, 1)  # per channel: g - b, b - r, r - g
    h6 = (nxt.gather(1, m) / cr.clamp(min=1e-6)).add_(m, alpha=2)
    n = constant((5.0, 3.0, 1.0), x.device, x.dtype).view(1, 3, 1, 1)
    k = torch.remainder(n + (h6 + 6.0 * f.view(-1, 1, 1, 1)), 6.0)
    return top - cr * torch.minimum(k, 4.0 - k).clamp_(0.0, 1.0)


def _apply(x: torch.Tensor, mask: np.ndarray, op, *args) -> None:
    """x[mask] = op(x[mask], args[mask]...) clamped and rounded to levels, in place."""
    rows = _rows(mask, x.device)
    if rows is not None:
        x[rows] = op(x[rows], *(a[rows] for a in args)).clamp_(0, 255).round_()


def color_jitter(x: torch.Tensor, jitter: np.ndarray, factors: np.ndarray, order: np.ndarray) -> torch.Tensor:
    """torchvision ColorJitter on the samples that drew it, each sample's four ops in its drawn order. Brightness,
    contrast and saturation are one blend f x + (1 - f) T (T = 0, the mean luma, the luma), so at step k every
    sample takes its k-th op in one pass over the batch: f = 1 (an exact no-op on integer levels) where the op
    is hue or the sample does not jitter. Hue takes the samples whose k-th op it is."""
    dev, n = x.device, x.shape[0]
    for k in range(order.shape[1]):
        op = np.where(jitter, order[:, k], -1)
        f = np.where((op >= 0) & (op <= 2), factors[np.arange(n), np.clip(op, 0, 3)], 1.0)
        w = np.stack([op == 1, op == 2], 1).astype(np.float32)  # weight of the mean luma, of the luma
        if (f != 1.0).any():
            fw = upload(np.concatenate([f[:, None], w], 1).astype(np.float32), dev, x.dtype)
            fk, wm, wl = (fw[:, j].view(-1, 1, 1, 1) for j in range(3))
            lum = luma(x)
            t = wm * lum.mean((1, 2, 3), keepdim=True) + wl * lum
            x = (fk * x + (1 - fk) * t).clamp_(0, 255).round_()
        _apply(x, op == 3, hue, upload(factors[:, 3], dev, x.dtype))
    return x


def grayscale(x: torch.Tensor, gray: np.ndarray) -> torch.Tensor:
    _apply(x, gray, lambda y: luma(y).repeat(1, 3, 1, 1))
    return x


def gaussian_kernels(sigma: torch.Tensor, radius: int = BLUR_RADIUS) -> torch.Tensor:
    """(n,) sigmas -> (n, 2 * radius + 1) normalized 1-D Gaussians."""
    t = torch.arange(-radius, radius + 1, device=sigma.device, dtype=sigma.dtype)
    k = torch.exp(-0.5 * (t[None] / sigma[:, None]) ** 2)
    return k / k.sum(1, keepdim=True)


def _blur(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """A true separable Gaussian per sample (as DALI's gaussian_blur), reflect-padded, one grouped conv per axis.
    In fp32 with one group per channel and contiguous tensors, CUDA runs torch's native depthwise kernel in plain
    fp32: cuDNN (and its TF32 default) is taken for depthwise convolutions only in fp16 or channels_last
    (ConvParams::use_cudnn_depthwise, aten/src/ATen/native/Convolution.cpp); gpu_checks.sh compares with the CPU."""
    n, c, h, w = x.shape
    k = gaussian_kernels(sigma).repeat_interleave(c, 0)  # (n * c, K)
    r = BLUR_RADIUS
    y = F.pad(x.reshape(1, n * c, h, w), (r, r, r, r), mode='reflect')
    y = F.conv2d(y, k.view(n * c, 1, 1, -1), groups=n * c)
    y = F.conv2d(y, k.view(n * c, 1, -1, 1), groups=n * c)
    return y.view(n, c, h, w)


def gaussian_blur(x: torch.Tensor, blur: np.ndarray, sigma: np.ndarray) -> torch.Tensor:
    _apply(x, blur, _blur, upload(sigma, x.device, x.dtype))
    return x


def cmae_views(imgs: list[torch.Tensor], d: dict, size: int, extra: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Spec section 7 for a batch: decoded uint8 (3, H, W) images and their draw_batch arrays -> (online, target),
    float (N, 3, size, size) normalized."""
    master = crop_resize(imgs, boxes_of(d, imgs), size + extra, d['flip'])
    online = master[:, :, :size, :size]
    target = windows(master, d['dy'], d['dx'], size)
    target = color_jitter(target, d['jitter'], d['factors'], d['order'])
    target = gaussian_blur(grayscale(target, d['gray']), d['blur'], d['sigma'])
    return normalize(online), normalize(target)


def debug_of(d: dict, boxes) -> dict:
    """The decisions a pipeline reports under debug=True (recipe.DEBUG_KEYS), as CPU tensors."""
    vals = dict(
        flip=d['flip'],
        dy=d['dy'],
        dx=d['dx'],
        jitter=d['jitter'],
        gray=d['gray'],
        blur=d['blur'],
        sigma=np.where(d['blur'], d['sigma'], 0.0),
        box=np.asarray(boxes, dtype=np.int64),
    )
    return {k: torch.as_tensor(np.asarray(v)).to(C.DEBUG_DTYPES[k]) for k, v in vals.items()}


def probe_views(imgs: list[torch.Tensor], d: dict, size: int) -> torch.Tensor:
    """RandomResizedCrop (0.08, 1) bicubic + flip from the draws (drawn with the classification scale) -> float
    (N, 3, S, S) in 0-255, not normalized."""
    return crop_resize(imgs, boxes_of(d, imgs), size, d['flip'])


def eval_views(imgs: list[torch.Tensor], size: int) -> torch.Tensor:
    """Short side to round(S * 256 / 224) bicubic (torchvision's long-side rounding), center crop S (torchvision's
    offsets) -> float (N, 3, S, S) in 0-255."""
    short = C.eval_resize_size(size)
    sizes = []
    for img in imgs:
        h, w = int(img.shape[-2]), int(img.shape[-1])
        sizes.append((short, int(short * w / h)) if h <= w else (int(short * h / w), short))
    out = []
    for y in resize_all(list(imgs), sizes):
        top, left = int(round((y.shape[-2] - size) / 2.0)), int(round((y.shape[-1] - size) / 2.0))
        out.append(y[:, top : top + size, left : left + size])
    return torch.stack(out)


_RAND_AUGMENT: dict = {}


def rand_augment(x: torch.Tensor, seeds: list[int]) -> torch.Tensor:
    """torchvision v2 RandAugment (2 ops, magnitude 9, the ImageNet mean as fill) per sample on uint8, each sample
    seeded from its own key. Differs from the torch pipeline's timm RandAugment: no magnitude noise (timm's std
    0.5, DALI has none either) and bilinear geometric ops (torchvision's tensor affine has no bicubic)."""
    from torchvision.transforms import InterpolationMode, v2

    if 'ra' not in _RAND_AUGMENT:
        _RAND_AUGMENT['ra'] = v2.RandAugment(
            num_ops=2, magnitude=9, interpolation=InterpolationMode.BILINEAR, fill=[int(round(m)) for m in C.MEAN]
        )
    ra, u8 = _RAND_AUGMENT['ra'], x.to(torch.uint8)
    # v2 draws from the global CPU generator (torch.randint / torch.rand without a generator) and takes none, so
    # that one generator is seeded per sample and restored after. torch.manual_seed would also reseed every CUDA
    # generator (torch/random.py, _manual_seed_impl), which fork_rng(devices=[]) does not restore: drop-path's
    # stream and the CUDA RNG state in checkpoints would follow the last sample's seed.
    with torch.random.fork_rng(devices=[]):
        for i, s in enumerate(seeds):
            torch.default_generator.manual_seed(s)
            u8[i] = ra(u8[i])
    return u8.float()
