"""The per-core cuts of data/views_torch.py against the transforms they replace: same draws, same pixels.

The cuts (decode without a copy for RGB files, the hue shift as a PIL lookup table, two copies to a tensor instead of
four) are exact, so the tolerance is zero: any pixel that moves fails.
"""

import numpy as np
import pytest
import torch
import torchvision.transforms.functional as tvF
from PIL import Image, ImageFilter

from cmae_ds.data.sources.files import embedded_samples
from cmae_ds.data.views import pil as V
from cmae_ds.data.views.draws import draw_views, rrc_box


def _before(path: str, d, size: int, extra: int):
    """cmae_views as it was before the cuts (torchvision's colour ops, numpy copies), with the master cropped and
    then resized as the official RandomResizedCrop does (mmcv's imcrop, then imresize)."""
    with Image.open(path) as im:
        im.load()
        img = im.convert('RGB')
    master = img.crop(_pil_box(rrc_box(d, img.width, img.height))).resize((size + extra,) * 2, Image.BICUBIC)
    if d.flip:
        master = master.transpose(Image.FLIP_LEFT_RIGHT)
    online, target = master.crop((0, 0, size, size)), master.crop((d.dx, d.dy, d.dx + size, d.dy + size))
    ops = (tvF.adjust_brightness, tvF.adjust_contrast, tvF.adjust_saturation, tvF.adjust_hue)
    if d.jitter:
        for i in d.order:
            target = ops[i](target, d.factors[i])
    if d.gray:
        target = tvF.rgb_to_grayscale(target, num_output_channels=3)
    if d.blur:
        target = target.filter(ImageFilter.GaussianBlur(radius=d.sigma))
    as_tensor = lambda im: torch.from_numpy(np.asarray(im, dtype=np.uint8).copy()).permute(2, 0, 1).contiguous()  # noqa: E731
    return as_tensor(online), as_tensor(target)


def _pil_box(box):
    top, left, h, w = box
    return (left, top, left + w, top + h)


@pytest.mark.parametrize('epoch', [0, 1])
def test_views_are_pixel_identical_to_before(epoch):
    samples = embedded_samples()[::4]  # 32 photos x 2 epochs: every colour op is drawn many times
    jittered = 0
    for index, (path, _) in enumerate(samples):
        d = draw_views(0, epoch, index, 32)
        jittered += d.jitter
        got = V.cmae_views(V.decode_rgb(path), d, 96, 32)
        want = _before(path, d, 96, 32)
        for g, w in zip(got, want):
            assert g.dtype == torch.uint8 and g.shape == w.shape and g.is_contiguous()
            assert torch.equal(g, w), f'{path} epoch {epoch}: views moved'
    assert jittered >= 10


def test_hue_matches_torchvision_both_ways():
    img = V.decode_rgb(embedded_samples()[0][0]).resize((64, 48))
    for factor in (-0.5, -0.21, -0.003, 0.0, 0.07, 0.5):
        assert np.array_equal(np.asarray(V.adjust_hue(img, factor)), np.asarray(tvF.adjust_hue(img, factor)))
