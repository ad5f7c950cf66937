"""Fine-tuning and evaluation loaders (docs/spec.md section 9) on both pipelines."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from PIL import Image

from cmae_ds.data import MEAN, STD, build_classification_loader
from cmae_ds.data.views.erasing import random_erasing
from cmae_ds.data.views.recipe import eval_resize_size

from data_helpers import PIPELINES, cfg, coord_image, random_jpegs, write_folder

S = 56


def _pixels(img: torch.Tensor) -> torch.Tensor:
    return img * torch.tensor(STD).view(1, 3, 1, 1) + torch.tensor(MEAN).view(1, 3, 1, 1)


def test_eval_resize_scales_256_over_224():
    assert eval_resize_size(224) == 256 and eval_resize_size(384) == 439 and eval_resize_size(56) == 64


@pytest.mark.parametrize('pipeline', PIPELINES)
def test_eval_resize_short_side_center_crop(tmp_path, pipeline):
    """A 150x100 coordinate image: short side -> 64, so 96x64; the center 56x56 covers x in [20, 76) of 96."""
    write_folder(tmp_path, {'a': [coord_image(150, 100)] * 2})
    loader = build_classification_loader(cfg(tmp_path, pipeline), train=False, img_size=S, batch_size=2)
    px = _pixels(next(iter(loader))['img'])
    ref = coord_image(150, 100).resize((96, 64), Image.BICUBIC).crop((20, 4, 76, 60))
    ref = torch.from_numpy(np.asarray(ref, dtype=np.float32)).permute(2, 0, 1)
    tol = 0.5 if pipeline == 'torch' else 3.0  # DALI's and torch's cubic resampling are not PIL's to the bit
    assert (px - ref).abs().amax() <= tol


@pytest.mark.parametrize('pipeline', PIPELINES)
def test_eval_padding_flagged_invalid(tmp_path, pipeline):
    random_jpegs(tmp_path, 10, classes=3, size=(40, 32))
    seen, invalid = [], 0
    for rank in range(3):
        loader = build_classification_loader(
            cfg(tmp_path, pipeline), train=False, img_size=16, batch_size=3, rank=rank, world_size=3
        )
        for b in loader:
            seen += b['index'][b['valid']].tolist()
            invalid += int((~b['valid']).sum())
            assert b['label'].dtype == torch.int64 and b['valid'].dtype == torch.bool
    assert sorted(seen) == list(range(10)) and invalid == 2


@pytest.mark.parametrize('pipeline', PIPELINES)
def test_train_loader_labels_and_augmentation(tmp_path, pipeline):
    random_jpegs(tmp_path, 12, classes=3, size=(64, 48))
    loader = build_classification_loader(cfg(tmp_path, pipeline), train=True, img_size=32, batch_size=4, seed=3)
    from cmae_ds.data import list_samples

    labels = [lab for _, lab in list_samples(cfg(tmp_path, pipeline))]
    loader.set_epoch(1)
    batches = list(loader)
    assert len(batches) == 3
    for b in batches:
        assert b['img'].shape == (4, 3, 32, 32) and b['img'].dtype == torch.float32
        assert b['label'].tolist() == [labels[i] for i in b['index'].tolist()]
        assert b['valid'].all()
    loader.set_epoch(1)
    again = list(loader)
    assert all(torch.equal(x['img'], y['img']) for x, y in zip(batches, again))  # deterministic per epoch


def test_random_erasing_rate_and_fill():
    x = torch.zeros(2000, 3, 24, 24)
    random_erasing(x, torch.Generator().manual_seed(0))
    erased = (x != 0).flatten(1).any(1).float().mean().item()
    assert abs(erased - 0.25) < 4 * math.sqrt(0.25 * 0.75 / 2000)
    noise = x[x != 0]
    assert abs(noise.mean().item()) < 0.05 and abs(noise.std().item() - 1) < 0.05


def test_torch_rand_augment_survives_the_largest_magnitudes():
    """timm's magnitude noise reaches 10, where posterize asks Pillow 13 for 0 bits; thousands of draws must run."""
    import random

    from PIL import Image as PILImage

    from cmae_ds.data.views.pil import _rand_augment

    random.seed(0)
    augment = _rand_augment(16)
    img = PILImage.new('RGB', (16, 16), (120, 60, 200))
    for _ in range(4000):
        augment(img)


@pytest.mark.parametrize('pipeline', PIPELINES)
def test_probe_augmentation_is_crop_and_flip_only(tmp_path, pipeline):
    """MAE's linear probe: RandomResizedCrop + flip and nothing else, so a single-colour photo stays that colour
    (RandAugment's colour ops or random erasing would change it)."""
    colours = [(200, 40, 90), (10, 220, 120), (90, 90, 250), (250, 250, 20)]
    for i, colour in enumerate(colours * 2):
        d = tmp_path / f'class_{i % 2}'
        d.mkdir(exist_ok=True)
        Image.new('RGB', (60, 44), colour).save(d / f'{i}.png')
    loader = build_classification_loader(
        cfg(tmp_path, pipeline), train=True, img_size=32, batch_size=4, seed=0, augment='probe'
    )
    loader.set_epoch(0)
    mean, std = torch.tensor(MEAN).view(3, 1, 1), torch.tensor(STD).view(3, 1, 1)
    from cmae_ds.data import list_samples

    paths = [p for p, _ in list_samples(cfg(tmp_path, pipeline))]
    for batch in loader:
        for img, index in zip(batch['img'], batch['index'].tolist()):
            colour = torch.tensor(Image.open(paths[index]).getpixel((0, 0)), dtype=torch.float32).view(3, 1, 1)
            assert (img * std + mean - colour).abs().max() < 1.0


def test_probe_views_are_the_same_crop_in_both_pipelines_and_resume_exactly(tmp_path):
    """Crop and flip come from the shared draws (drawn with the classification scale), so the two pipelines' probe
    views of coordinate-encoded images differ only by resampling; a DALI run started at batch 2 repeats them."""
    write_folder(tmp_path, {'wide': [coord_image(160, 120)] * 8, 'tall': [coord_image(120, 160)] * 8})
    runs = {}
    for pipeline in PIPELINES:
        loader = build_classification_loader(
            cfg(tmp_path, pipeline), train=True, img_size=32, batch_size=4, seed=3, augment='probe'
        )
        loader.set_epoch(1)
        runs[pipeline] = list(loader)
        if pipeline != 'torch':
            loader.skip_batches(2)
            resumed = list(loader)
            assert len(resumed) == len(runs[pipeline]) - 2 > 0
            assert all(torch.equal(a['img'], b['img']) for a, b in zip(runs[pipeline][2:], resumed))
    for other in PIPELINES[1:]:
        for a, b in zip(runs['torch'], runs[other]):
            assert torch.equal(a['index'], b['index'])
            assert (_pixels(a['img']) - _pixels(b['img'])).abs().max() < 3, other
