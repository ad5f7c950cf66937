"""DALI graphs: docs/spec.md section 7 (pretraining views) and section 9 (classification), for GPU or CPU operators.

The pretraining graph draws nothing itself: its random decisions come from draws.py through an external source,
keyed by (seed, epoch, index) like the torch pipeline's, so a resumed epoch repeats its views exactly and both
pipelines make the same views of a sample. The classification training graphs take their crop and flip the same
way; only DALI's RandAugment draws from DALI's own generator.

The reader gets this rank's files already in epoch order (sampling.ShardPlan) and each file's dataset index as its
"label", so DALI and torch read identical batches and the loader looks labels up by index.
"""

from __future__ import annotations

import numpy as np
from nvidia.dali import fn, types
from nvidia.dali import math as dmath

from . import recipe as C
from .draws import ATTEMPTS, CLS_COLUMNS, DALI_COLUMNS

READER = 'reader'


def read_files(files, indices: list[int]):
    """-> (encoded bytes, dataset index). pad_last_batch repeats the last file so the final batch is full; the
    iterator's PARTIAL policy trims it again. `files` may instead be a dali_pipeline.RecordFeed (shards): an
    external source of the batch's bytes, padded the same way."""
    if callable(files):
        return fn.external_source(
            source=files, num_outputs=2, batch=True, batch_info=True, dtype=[types.UINT8, types.INT32]
        )
    return fn.readers.file(files=files, labels=indices, random_shuffle=False, pad_last_batch=True, name=READER)


# Decode as PIL and torchvision do, so the three pipelines see the same pixels: EXIF orientation ignored (PIL's
# Image.open and decode_jpeg's apply_exif_orientation=False; DALI rotates by default, which would also swap the
# height and width the crop boxes are drawn on), and libjpeg-turbo's fancy chroma upsampling (the cpu backend's
# own; the mixed backend's nvJPEG does it only when asked).
DECODE = dict(adjust_orientation=False, jpeg_fancy_upsampling=True)


def _decoder_kwargs(device: str, hw_decoder_load: float) -> dict:
    kw = dict(device='mixed' if device == 'gpu' else 'cpu', output_type=types.RGB, **DECODE)
    if device == 'gpu':
        kw['hw_decoder_load'] = hw_decoder_load
    return kw


def _normalize(img, **crop_mirror):
    """uint8 HWC -> float CHW normalized on 0-255 values (docs/spec.md section 7, step 5), with optional crop/mirror
    fused in."""
    return fn.crop_mirror_normalize(
        img, dtype=types.FLOAT, output_layout='CHW', mean=list(C.MEAN), std=list(C.STD), **crop_mirror
    )


def rrc_box(jpegs, scale, aspect, u_top, u_left):
    """draws.rrc_box in graph operators, same float32 operations in the same order -> (top, left, h, w) floats.
    The image size comes from the JPEG header; the first fitting candidate is picked without a loop."""
    shape = fn.peek_image_shape(jpegs, dtype=types.FLOAT, adjust_orientation=DECODE['adjust_orientation'])
    H, W = shape[0], shape[1]
    ta = H * W * scale
    w = dmath.floor(dmath.sqrt(ta * aspect) + 0.5)
    h = dmath.floor(dmath.sqrt(ta / aspect) + 0.5)
    ok = (w <= W) & (h <= H) & (w > 0.0) & (h > 0.0)
    rank = types.Constant(np.arange(ATTEMPTS, 0, -1, dtype=np.float32), device='cpu')  # 10 for the first
    best = fn.reductions.max(fn.cast(ok, dtype=types.FLOAT) * rank)  # 0: none fits
    pick = fn.cast(rank == best, dtype=types.FLOAT)
    found = fn.cast(best > 0.0, dtype=types.FLOAT)
    in_ratio = W / H
    lt = fn.cast(in_ratio < float(np.float32(C.RATIO[0])), dtype=types.FLOAT)
    gt = fn.cast(in_ratio > float(np.float32(C.RATIO[1])), dtype=types.FLOAT)
    mid = 1.0 - lt - gt
    wf = lt * W + gt * dmath.floor(H * float(np.float32(C.RATIO[1])) + 0.5) + mid * W
    hf = lt * dmath.floor(W / float(np.float32(C.RATIO[0])) + 0.5) + gt * H + mid * H
    w = found * fn.reductions.sum(w * pick) + (1.0 - found) * wf
    h = found * fn.reductions.sum(h * pick) + (1.0 - found) * hf
    top = found * dmath.min(dmath.floor(u_top * (H - h + 1.0)), H - h) + (1.0 - found) * dmath.floor((H - h) / 2.0)
    left = found * dmath.min(dmath.floor(u_left * (W - w + 1.0)), W - w) + (1.0 - found) * dmath.floor((W - w) / 2.0)
    return top, left, h, w


def target_color_ops(view, d: dict):
    """Color jitter and grayscale as one affine color_twist (saturation 0 is grayscale, luma kept in all three
    channels), then Gaussian blur; each only on the samples that drew it (DALI conditionals)."""
    if d['jitter'] | d['gray']:
        view = fn.color_twist(
            view, brightness=d['brightness'], contrast=d['contrast'], saturation=d['saturation'], hue=d['hue']
        )
    if d['blur']:
        view = fn.gaussian_blur(view, sigma=d['sigma'])
    return view


def cmae_views(files, indices, feed, size: int, extra: int, device: str, hw_decoder_load: float, debug: bool):
    """docs/spec.md section 7 with the draws of `feed` (an external-source callback, draws.py) ->
    (img, img_target, index[, debug...]); img and img_target float (3, S, S) normalized."""
    jpegs, index = read_files(files, indices)
    d = _draws(feed, DALI_COLUMNS)
    master, box = _decode_box(jpegs, d, device, hw_decoder_load)
    m = size + extra
    master = fn.resize(master, size=[m, m], interp_type=types.INTERP_CUBIC, antialias=True)
    # The flip is folded into the crops: window x of the flipped master is the mirror of window (extra - x) of
    # the master, so no flipped copy of the master is ever written (a full pass saved on CPU operators).
    flip_i = fn.cast(d['flip'], dtype=types.INT32)
    online = _normalize(
        master, crop=[size, size], crop_pos_x=fn.cast(d['flip'], dtype=types.FLOAT), crop_pos_y=0.0, mirror=flip_i
    )
    # An integer anchor is absolute, so the window lands on exact pixels.
    dy, dx = d['dy'], d['dx']
    x0 = dx + flip_i * (extra - 2 * dx)
    anchor = fn.cat(fn.reshape(dy, shape=[1]), fn.reshape(x0, shape=[1]))
    target = fn.slice(master, anchor, types.Constant(np.array([size, size], dtype=np.int32), device='cpu'), axes=[0, 1])
    target = target_color_ops(target, d)
    outs = [online, _normalize(target, mirror=flip_i), index]
    if debug:
        box = fn.cast(fn.stack(*box), dtype=types.INT64)
        sigma = d['sigma'] * fn.cast(d['blur'], dtype=types.FLOAT)
        outs += [d['flip'], dy, dx, d['jitter'], d['gray'], d['blur'], sigma, box]
    return tuple(outs)


def _draws(feed, columns: tuple) -> dict:
    """The per-sample draws of `feed` (an external-source callback returning one array per column)."""
    return dict(zip(columns, fn.external_source(source=feed, num_outputs=len(columns), batch=True, batch_info=True)))


def _decode_box(jpegs, d: dict, device: str, hw_decoder_load: float):
    """Decode only the draws' random-resized-crop box -> (uint8 HWC crop, (top, left, h, w))."""
    top, left, h, w = rrc_box(jpegs, d['scale'], d['aspect'], d['u_top'], d['u_left'])
    img = fn.decoders.image_slice(
        jpegs,
        fn.stack(left, top),
        fn.stack(w, h),
        axis_names='WH',
        normalized_anchor=False,
        normalized_shape=False,
        **_decoder_kwargs(device, hw_decoder_load),
    )
    return img, (top, left, h, w)


def _crop_from_draws(jpegs, feed, device: str, hw_decoder_load: float):
    """-> (uint8 HWC crop, flip) for the classification training graphs."""
    d = _draws(feed, CLS_COLUMNS)
    return _decode_box(jpegs, d, device, hw_decoder_load)[0], d['flip']


def cls_train_view(files, indices, feed, size: int, device: str, hw_decoder_load: float):
    """RandomResizedCrop (0.08, 1) bicubic + flip (from the shared draws) + RandAugment(n 2, m 9, DALI's own
    generator) -> (img float (3, S, S), index). DALI's RandAugment has no magnitude noise (timm's mstd 0.5);
    random erasing runs on the batch in torch."""
    from nvidia.dali.auto_aug import rand_augment

    jpegs, index = read_files(files, indices)
    img, flip = _crop_from_draws(jpegs, feed, device, hw_decoder_load)
    img = fn.resize(img, size=[size, size], interp_type=types.INTERP_CUBIC, antialias=True)
    img = fn.flip(img, horizontal=fn.cast(flip, dtype=types.INT32))
    img = rand_augment.rand_augment(
        img, n=2, m=9, shape=[size, size], fill_value=int(round(C.MEAN[0])), monotonic_mag=True
    )
    return _normalize(img), index


def cls_probe_view(files, indices, feed, size: int, device: str, hw_decoder_load: float):
    """Linear probing (MAE's recipe): RandomResizedCrop (0.08, 1) bicubic + flip, all from the shared draws ->
    (img float (3, S, S), index)."""
    jpegs, index = read_files(files, indices)
    img, flip = _crop_from_draws(jpegs, feed, device, hw_decoder_load)
    img = fn.resize(img, size=[size, size], interp_type=types.INTERP_CUBIC, antialias=True)
    return _normalize(img, mirror=fn.cast(flip, dtype=types.INT32)), index


def cls_eval_view(files, indices, size: int, device: str, hw_decoder_load: float):
    """Resize the short side to 256/224 * S (bicubic), center crop S -> (img float (3, S, S), index)."""
    jpegs, index = read_files(files, indices)
    img = fn.decoders.image(jpegs, **_decoder_kwargs(device, hw_decoder_load))
    img = fn.resize(img, resize_shorter=C.eval_resize_size(size), interp_type=types.INTERP_CUBIC, antialias=True)
    img = fn.crop_mirror_normalize(
        img,
        crop=[size, size],
        crop_pos_x=0.5,
        crop_pos_y=0.5,
        dtype=types.FLOAT,
        output_layout='CHW',
        mean=list(C.MEAN),
        std=list(C.STD),
    )
    return img, index
