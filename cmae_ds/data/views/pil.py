"""docs/spec.md section 7 (and the section 9 classification transforms) on PIL images, one sample at a time.

Crops, flips and the pretraining view decisions come from draws.py (the DALI pipeline's draws too); RandAugment is
seeded from a numpy Generator keyed by (seed, epoch, index). So a sample's views do not depend on the worker that
made them or on where a run resumed.
"""

from __future__ import annotations

import random

import numpy as np
import torch
import torchvision.transforms.functional as tvF
from PIL import Image, ImageFilter

from . import recipe as C
from .draws import ViewDraws
from .draws import rrc_box as rrc_box_of


def decode_rgb(path: str) -> Image.Image:
    """Any PIL-readable file (JPEG incl. CMYK and grayscale, PNG with alpha or palette) -> RGB. Raises on a
    truncated or corrupt file (PIL's default), which the caller turns into a skip."""
    with Image.open(path) as im:
        im.load()
        return im if im.mode == 'RGB' else im.convert('RGB')  # most JPEGs: no copy


def resized_crop(img: Image.Image, box, size: int) -> Image.Image:
    """Crop, then resize, as the official RandomResizedCrop (mmcv's imcrop, then imresize with the pillow backend)
    and torchvision's: PIL's resize with `box=` reads pixels beyond the box for the filter's support at its edges
    (up to a level or two there)."""
    top, left, h, w = box
    return img.crop((left, top, left + w, top + h)).resize((size, size), Image.BICUBIC)


def adjust_hue(img: Image.Image, factor: float) -> Image.Image:
    """torchvision's adjust_hue on an RGB PIL image, pixel for pixel, with the hue shift as a PIL lookup table
    instead of a round trip through numpy."""
    h, s, v = img.convert('HSV').split()
    shift = int(np.int8(factor * 255).astype(np.uint8))  # torchvision's wrap-around uint8 add
    h = h.point([(i + shift) & 255 for i in range(256)])
    return Image.merge('HSV', (h, s, v)).convert('RGB')


_JITTER_OPS = (tvF.adjust_brightness, tvF.adjust_contrast, tvF.adjust_saturation, adjust_hue)


def _jitter(img: Image.Image, factors, order) -> Image.Image:
    for i in order:
        img = _JITTER_OPS[i](img, factors[i])
    return img


def to_uint8_chw(img: Image.Image) -> torch.Tensor:
    """RGB PIL -> uint8 (3, H, W): two copies (PIL's bytes, then the channel-first layout), not four."""
    hwc = np.frombuffer(img.tobytes(), dtype=np.uint8).reshape(img.height, img.width, 3)
    return torch.from_numpy(np.ascontiguousarray(hwc.transpose(2, 0, 1)))


def cmae_views(img: Image.Image, d: ViewDraws, size: int, extra: int) -> tuple[torch.Tensor, torch.Tensor]:
    """RGB PIL -> (online, target), each uint8 (3, size, size), not normalized."""
    master = resized_crop(img, rrc_box_of(d, img.width, img.height), size + extra)
    if d.flip:
        master = master.transpose(Image.FLIP_LEFT_RIGHT)
    online = master.crop((0, 0, size, size))
    target = master.crop((d.dx, d.dy, d.dx + size, d.dy + size))
    if d.jitter:
        target = _jitter(target, d.factors, d.order)
    if d.gray:
        target = tvF.rgb_to_grayscale(target, num_output_channels=3)
    if d.blur:
        # The official pipeline (mmselfsup GaussianBlur) blurs with PIL's radius = sigma.
        target = target.filter(ImageFilter.GaussianBlur(radius=d.sigma))
    return to_uint8_chw(online), to_uint8_chw(target)


def eval_view(img: Image.Image, size: int) -> torch.Tensor:
    """Resize the short side to 256/224 * size (bicubic), center crop size -> uint8 (3, size, size)."""
    img = tvF.resize(img, C.eval_resize_size(size), interpolation=tvF.InterpolationMode.BICUBIC)
    return to_uint8_chw(tvF.center_crop(img, [size, size]))


def _rand_augment(size: int):
    from timm.data.auto_augment import rand_augment_transform

    # magnitude_max 9.99: with std 0.5 the magnitude can reach 10, where posterize keeps 0 bits, which Pillow 13
    # rejects ("bits must be between or equal to 1 and 8"); 9.99 keeps 1 bit and changes no other op measurably.
    hparams = dict(
        translate_const=int(size * 0.45),
        img_mean=tuple(int(round(m)) for m in C.MEAN),
        interpolation=Image.BICUBIC,
        magnitude_max=9.99,
    )
    return rand_augment_transform('rand-m9-n2-mstd0.5-inc1', hparams)


_RA_CACHE: dict[int, object] = {}


def probe_view(img: Image.Image, d: ViewDraws, size: int) -> torch.Tensor:
    """Linear probing (MAE's recipe): RandomResizedCrop (0.08, 1) bicubic + flip only -> uint8 (3, S, S); the crop and
    flip come from the shared draws (drawn with the classification scale)."""
    img = resized_crop(img, rrc_box_of(d, img.width, img.height), size)
    if d.flip:
        img = img.transpose(Image.FLIP_LEFT_RIGHT)
    return to_uint8_chw(img)


def train_view(img: Image.Image, d: ViewDraws, rng: np.random.Generator, size: int) -> torch.Tensor:
    """RandomResizedCrop (0.08, 1) bicubic + flip (shared draws) + RandAugment(2, 9, std 0.5, increasing, seeded
    from `rng`) -> uint8 (3, S, S). Random erasing happens on the normalized batch (erasing.random_erasing)."""
    img = resized_crop(img, rrc_box_of(d, img.width, img.height), size)
    if d.flip:
        img = img.transpose(Image.FLIP_LEFT_RIGHT)
    if size not in _RA_CACHE:
        _RA_CACHE[size] = _rand_augment(size)
    ra = _RA_CACHE[size]
    # timm draws from the global `random`/numpy state: seed it per sample, then put the caller's state back.
    state_py, state_np = random.getstate(), np.random.get_state()
    random.seed(int(rng.integers(2**62)))
    np.random.seed(int(rng.integers(2**31)))
    try:
        img = ra(img)
    finally:
        random.setstate(state_py)
        np.random.set_state(state_np)
    return to_uint8_chw(img)
