"""The three pipelines decode a JPEG alike: EXIF orientation ignored, as PIL's Image.open and torchvision's
decode_jpeg do (DALI's decoders and peek_image_shape apply it by default), and with libjpeg-turbo's fancy chroma
upsampling (4:2:0 JPEGs here, PIL's default)."""

from __future__ import annotations

import pytest
import torch
from PIL import Image

from cmae_ds.data import STD, build_classification_loader, build_pretrain_loader

from data_helpers import PIPELINES, cfg, coord_image

pytest.importorskip('nvidia.dali')

LEVELS = torch.tensor(STD).view(1, 3, 1, 1)


def _photos(root, exif: bool):
    """Eight wide photos; with `exif`, the same JPEG data tagged 'rotate 90 degrees' (orientation 6), which a
    decoder that applies it turns into tall images."""
    tag = Image.Exif()
    tag[0x0112] = 6
    (root / 'c0').mkdir(parents=True)
    for i in range(8):
        kw = dict(exif=tag.tobytes()) if exif else {}
        coord_image(96 + 8 * i, 64).save(root / 'c0' / f'{i}.jpg', quality=90, **kw)
    return root


@pytest.fixture(scope='module')
def roots(tmp_path_factory):
    rotated = _photos(tmp_path_factory.mktemp('rotated'), exif=True)
    assert Image.open(rotated / 'c0' / '0.jpg').getexif()[0x0112] == 6
    return rotated, _photos(tmp_path_factory.mktemp('plain'), exif=False)


def test_pretraining_boxes_and_views_agree_on_rotated_photos(roots):
    """The boxes are drawn on the header's size: a rotating decoder would draw them on a 64-wide image."""
    runs = {}
    for pipeline in PIPELINES:
        loader = build_pretrain_loader(cfg(roots[0], pipeline, extra=8), img_size=32, batch_size=8, debug=True)
        loader.set_epoch(0)
        runs[pipeline] = next(iter(loader))
    want = runs['torch']
    assert (want['debug']['box'][:, 3] > 64).any()  # boxes wider than a rotated photo
    for pipeline in PIPELINES[1:]:
        got = runs[pipeline]
        assert torch.equal(got['debug']['box'], want['debug']['box']), pipeline
        assert ((got['img'] - want['img']) * LEVELS).abs().max() < 3, pipeline


@pytest.mark.parametrize('pipeline', PIPELINES)
def test_the_orientation_tag_changes_nothing(roots, pipeline):
    """Evaluation views (the whole image, short side resized) of tagged and untagged copies of the same JPEG data."""
    got = []
    for root in roots:
        loader = build_classification_loader(cfg(root, pipeline), train=False, img_size=32, batch_size=8)
        got.append(next(iter(loader))['img'])
    assert torch.equal(got[0], got[1])
