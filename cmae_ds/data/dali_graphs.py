"""DALI graphs: spec section 7 (pretraining views) and section 9 (classification), for GPU or CPU operators.

The reader gets this rank's files already in epoch order (sampling.ShardPlan) and each file's dataset index as its
"label", so DALI and torch read identical batches and the loader looks labels up by index.
"""
from __future__ import annotations

import numpy as np
from nvidia.dali import fn, types

from . import common as C

READER = 'reader'


def read_files(files: list[str], indices: list[int]):
    """-> (encoded bytes, dataset index). pad_last_batch repeats the last file so the final batch is full; the
    iterator's PARTIAL policy trims it again."""
    return fn.readers.file(files=files, labels=indices, random_shuffle=False, pad_last_batch=True, name=READER)


def _decoder_kwargs(device: str, hw_decoder_load: float) -> dict:
    kw = dict(device='mixed' if device == 'gpu' else 'cpu', output_type=types.RGB)
    if device == 'gpu':
        kw['hw_decoder_load'] = hw_decoder_load
    return kw


def _coin(p: float):
    return fn.random.coin_flip(probability=p, dtype=types.BOOL)


def _apply(flag, value, identity: float):
    """value where flag else identity, per sample, without a conditional split."""
    return identity + fn.cast(flag, dtype=types.FLOAT) * (value - identity)


def _normalize(img, **crop_mirror):
    """uint8 HWC -> float CHW normalized on 0-255 values (spec 7.5), with optional crop/mirror fused in."""
    return fn.crop_mirror_normalize(img, dtype=types.FLOAT, output_layout='CHW', mean=list(C.MEAN), std=list(C.STD),
                                    **crop_mirror)


def target_color_ops(view):
    """Color jitter (p 0.8), grayscale (p 0.2, 3 channels), Gaussian blur (p 0.5, sigma U[0.1, 2]) on uint8 HWC.

    color_twist is one affine color transform, so jitter and grayscale (saturation 0, luma kept in all three
    channels) fuse into one pass. Returns (view, debug dict of DataNodes).
    """
    jitter, gray, blur = _coin(C.JITTER_P), _coin(C.GRAY_P), _coin(C.BLUR_P)
    b = _apply(jitter, fn.random.uniform(range=[1 - C.BRIGHTNESS, 1 + C.BRIGHTNESS]), 1.0)
    c = _apply(jitter, fn.random.uniform(range=[1 - C.CONTRAST, 1 + C.CONTRAST]), 1.0)
    s = _apply(jitter, fn.random.uniform(range=[1 - C.SATURATION, 1 + C.SATURATION]), 1.0)
    h = _apply(jitter, fn.random.uniform(range=[-C.HUE * 360, C.HUE * 360]), 0.0)  # degrees
    s = s * (1.0 - fn.cast(gray, dtype=types.FLOAT))
    if jitter | gray:  # the 16% of samples with neither skip the pass
        view = fn.color_twist(view, brightness=b, contrast=c, saturation=s, hue=h)
    sigma = fn.random.uniform(range=list(C.BLUR_SIGMA))
    if blur:  # a conditional: only the blurred part of the batch pays for the convolution
        view = fn.gaussian_blur(view, sigma=sigma)
    return view, dict(jitter=jitter, gray=gray, blur=blur, sigma=_apply(blur, sigma, 0.0))


def cmae_views(files, indices, size: int, extra: int, device: str, hw_decoder_load: float, debug: bool):
    """Spec section 7: -> (img, img_target, index[, debug...]); img and img_target float (3, S, S) normalized."""
    jpegs, index = read_files(files, indices)
    master = fn.decoders.image_random_crop(jpegs, random_area=list(C.MASTER_SCALE), random_aspect_ratio=list(C.RATIO),
                                           num_attempts=10, **_decoder_kwargs(device, hw_decoder_load))
    m = size + extra
    master = fn.resize(master, size=[m, m], interp_type=types.INTERP_CUBIC, antialias=True)
    # The flip is folded into the crops: window x of the flipped master is the mirror of window (extra - x) of
    # the master, so no flipped copy of the master is ever written (a full pass saved on CPU operators).
    flip = _coin(0.5)
    flip_i = fn.cast(flip, dtype=types.INT32)
    online = _normalize(master, crop=[size, size], crop_pos_x=fn.cast(flip, dtype=types.FLOAT), crop_pos_y=0.0,
                        mirror=flip_i)
    # (dy, dx) integer in [0, extra - 1]; an integer anchor is absolute, so the window lands on exact pixels.
    dy = fn.random.uniform(values=list(range(extra)), dtype=types.INT32)
    dx = fn.random.uniform(values=list(range(extra)), dtype=types.INT32)
    x0 = dx + flip_i * (extra - 2 * dx)
    anchor = fn.cat(fn.reshape(dy, shape=[1]), fn.reshape(x0, shape=[1]))
    target = fn.slice(master, anchor, types.Constant(np.array([size, size], dtype=np.int32), device='cpu'), axes=[0, 1])
    target, dbg = target_color_ops(target)
    outs = [online, _normalize(target, mirror=flip_i), index]
    if debug:
        outs += [flip, dy, dx, dbg['jitter'], dbg['gray'], dbg['blur'], dbg['sigma']]
    return tuple(outs)


def cls_train_view(files, indices, size: int, device: str, hw_decoder_load: float):
    """RandomResizedCrop (0.08, 1) bicubic + flip + RandAugment(n 2, m 9) -> (img float (3, S, S), index).
    DALI's RandAugment has no magnitude noise (timm's mstd 0.5); random erasing runs on the batch in torch."""
    from nvidia.dali.auto_aug import rand_augment
    jpegs, index = read_files(files, indices)
    img = fn.decoders.image_random_crop(jpegs, random_area=list(C.CLS_SCALE), random_aspect_ratio=list(C.RATIO),
                                        num_attempts=10, **_decoder_kwargs(device, hw_decoder_load))
    img = fn.resize(img, size=[size, size], interp_type=types.INTERP_CUBIC, antialias=True)
    img = fn.flip(img, horizontal=fn.random.coin_flip(probability=0.5))
    img = rand_augment.rand_augment(img, n=2, m=9, shape=[size, size], fill_value=int(round(C.MEAN[0])),
                                    monotonic_mag=True)
    return _normalize(img), index


def cls_probe_view(files, indices, size: int, device: str, hw_decoder_load: float):
    """Linear probing (MAE's recipe): RandomResizedCrop (0.08, 1) bicubic + flip -> (img float (3, S, S), index)."""
    jpegs, index = read_files(files, indices)
    img = fn.decoders.image_random_crop(jpegs, random_area=list(C.CLS_SCALE), random_aspect_ratio=list(C.RATIO),
                                        num_attempts=10, **_decoder_kwargs(device, hw_decoder_load))
    img = fn.resize(img, size=[size, size], interp_type=types.INTERP_CUBIC, antialias=True)
    return _normalize(img, mirror=fn.random.coin_flip(probability=0.5)), index


def cls_eval_view(files, indices, size: int, device: str, hw_decoder_load: float):
    """Resize the short side to 256/224 * S (bicubic), center crop S -> (img float (3, S, S), index)."""
    jpegs, index = read_files(files, indices)
    img = fn.decoders.image(jpegs, **_decoder_kwargs(device, hw_decoder_load))
    img = fn.resize(img, resize_shorter=C.eval_resize_size(size), interp_type=types.INTERP_CUBIC, antialias=True)
    img = fn.crop_mirror_normalize(img, crop=[size, size], crop_pos_x=0.5, crop_pos_y=0.5, dtype=types.FLOAT,
                                   output_layout='CHW', mean=list(C.MEAN), std=list(C.STD))
    return img, index
