"""Spec section 7 (and the section 9 classification transforms) as batched tensor ops on decoded images, on any
device: the torch_gpu pipeline runs them on CUDA, the test suite on CPU tensors.

Every random decision comes from draws.py (the arrays of draw_batch, batch first), so a sample is cropped, flipped
and shifted exactly as by the torch and DALI pipelines. Images enter as a list of uint8 (3, H, W) tensors (sizes
differ); after the crop-resize everything is master-sized and the rest works on one (N, 3, M, M) float tensor in
0-255 units, rounded after each op the way the uint8 pipelines quantize. Per-sample selections (who is jittered,
blurred, ...) are index lists built from the draws on the host and queued to the device from pinned memory
(upload.py), so nothing here waits on the device; the exceptions are torchvision's RandAugment (fine-tuning: its
affine ops build their matrices with blocking copies) and a crop too large for the CUDA resize (_bicubic_aa).
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


def crop_resize(imgs: list[torch.Tensor], boxes, size: int) -> torch.Tensor:
    """Random-resized-crop: each image's box resized to size x size -> float (N, 3, size, size)."""
    crops = [img[:, t : t + h, l : l + w] for img, (t, l, h, w) in zip(imgs, boxes)]
    out = torch.empty((len(crops), 3, size, size), device=imgs[0].device)
    resize_all(crops, [(size, size)] * len(crops), out)
    return out


def _rows(mask: np.ndarray, device) -> torch.Tensor | None:
    idx = np.flatnonzero(mask)
    return upload(idx, device) if len(idx) else None


def where_flip(x: torch.Tensor, flip: np.ndarray) -> torch.Tensor:
    rows = _rows(flip, x.device)
    if rows is not None:
        x[rows] = x[rows].flip(-1)
    return x


def windows(master: torch.Tensor, dy: np.ndarray, dx: np.ndarray, size: int) -> torch.Tensor:
    """(N, 3, M, M) -> (N, 3, size, size): sample n's window at (dy[n], dx[n]), copied in one stack."""
    return torch.stack([m[:, y : y + size, x : x + size] for m, y, x in zip(master, dy.tolist(), dx.tolist())])


def luma(x: torch.Tensor) -> torch.Tensor:
    """(N, 3, H, W) -> (N, 1, H, W)."""
    w = constant(LUMA, x.device, x.dtype).view(1, 3, 1, 1)
    return (x * w).sum(1, keepdim=True)


def _per_sample(f: torch.Tensor) -> torch.Tensor:
    return f.view(-1, 1, 1, 1)


def brightness(x: torch.Tensor, f: torch.Tensor) -> torch.Tensor:
    return x * _per_sample(f)


def contrast(x: torch.Tensor, f: torch.Tensor) -> torch.Tensor:
    # Blend with the image's mean luma (PIL ImageEnhance.Contrast, torchvision adjust_contrast).
    mean = luma(x).mean((1, 2, 3), keepdim=True)
    return _per_sample(f) * x + (1 - _per_sample(f)) * mean


def saturation(x: torch.Tensor, f: torch.Tensor) -> torch.Tensor:
    return _per_sample(f) * x + (1 - _per_sample(f)) * luma(x)


def rgb_to_hsv(x: torch.Tensor) -> torch.Tensor:
    """(N, 3, H, W) in [0, 1] -> hue, saturation, value (torchvision's tensor formulas, batched)."""
    r, g, b = x.unbind(1)
    maxc, minc = x.amax(1), x.amin(1)
    flat = maxc == minc
    cr = maxc - minc
    s = cr / torch.where(flat, torch.ones_like(maxc), maxc)
    div = torch.where(flat, torch.ones_like(cr), cr)
    rc, gc, bc = (maxc - r) / div, (maxc - g) / div, (maxc - b) / div
    hr = (maxc == r) * (bc - gc)
    hg = ((maxc == g) & (maxc != r)) * (2.0 + rc - bc)
    hb = ((maxc != g) & (maxc != r)) * (4.0 + gc - rc)
    h = torch.fmod((hr + hg + hb) / 6.0 + 1.0, 1.0)
    return torch.stack((h, s, maxc), 1)


def hsv_to_rgb(x: torch.Tensor) -> torch.Tensor:
    """Inverse of rgb_to_hsv: channel c = v - v s clamp(min(k, 4 - k), 0, 1) with k = (n_c + 6 h) mod 6, n = 5, 3, 1
    (the closed form of the six-sector table, a few elementwise ops)."""
    h, s, v = x.unbind(1)
    n = constant((5.0, 3.0, 1.0), x.device, x.dtype).view(1, 3, 1, 1)
    k = torch.remainder(n + 6.0 * h.unsqueeze(1), 6.0)
    ramp = torch.minimum(k, 4.0 - k).clamp_(0.0, 1.0)
    return v.unsqueeze(1) - (v * s).unsqueeze(1) * ramp


def hue(x: torch.Tensor, f: torch.Tensor) -> torch.Tensor:
    hsv = rgb_to_hsv(x / 255.0)
    hsv[:, 0] = torch.remainder(hsv[:, 0] + f.view(-1, 1, 1), 1.0)
    return hsv_to_rgb(hsv) * 255.0


JITTER_OPS = (brightness, contrast, saturation, hue)  # the factor columns and order codes of draw_batch


def _apply(x: torch.Tensor, mask: np.ndarray, op, *args) -> None:
    """x[mask] = op(x[mask], args[mask]...) clamped and rounded to levels, in place."""
    rows = _rows(mask, x.device)
    if rows is not None:
        x[rows] = op(x[rows], *(a[rows] for a in args)).clamp_(0, 255).round_()


def color_jitter(x: torch.Tensor, jitter: np.ndarray, factors: np.ndarray, order: np.ndarray) -> torch.Tensor:
    """torchvision ColorJitter on the samples that drew it, each sample's four ops in its drawn order: at step k
    the samples whose k-th op is op j take op j together."""
    f = upload(factors, x.device, x.dtype)
    for k in range(order.shape[1]):
        for j, op in enumerate(JITTER_OPS):
            _apply(x, jitter & (order[:, k] == j), op, f[:, j])
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
    master = where_flip(crop_resize(imgs, boxes_of(d, imgs), size + extra), d['flip'])
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
    return where_flip(crop_resize(imgs, boxes_of(d, imgs), size), d['flip'])


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


def train_views(imgs: list[torch.Tensor], d: dict, seeds: list[int], size: int) -> torch.Tensor:
    """Fine-tuning: the probe's crop and flip, then RandAugment per sample -> float (N, 3, S, S) in 0-255."""
    return rand_augment(probe_views(imgs, d, size), seeds)
