"""Labels follow images: unreadable files planted at class boundaries. The torch pipeline replaces each by the next
readable image, which then carries its own class (the next class, or the first after the last); DALI never
substitutes: it stops naming the file, and on the scanner's clean list its labels are those of the files read."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import torch

from cmae_ds.data import build_classification_loader
from cmae_ds.data.pipelines.build import dali_available
from cmae_ds.data.sources.files import DataFileError, folder_samples
from cmae_ds.data.sources.scan import scan_folder
from cmae_ds.data.views.recipe import MEAN, STD

from data_helpers import cfg, solid_image, write_folder

COLORS = ((230, 20, 20), (20, 230, 20), (20, 20, 230))  # class k is a solid color: the image tells its class


@pytest.fixture
def boundary_folder(tmp_path):
    """3 classes of 4 solid-color JPEGs; unreadable files sort last in every class (two in the middle one)."""
    root = tmp_path / 'data'
    good = write_folder(
        root, {f'c{k}': [solid_image(40, 32, c) for _ in range(4)] for k, c in enumerate(COLORS)}, '.jpg', quality=95
    )
    truncated = Path(good[0]).read_bytes()[:300]
    bad = {
        'c0/zz_bad.jpg': b'not an image\n' * 10,
        'c1/zz_bad0.jpg': truncated,
        'c1/zz_bad1.jpg': b'',
        'c2/zz_bad.jpg': truncated,
    }
    for rel, data in bad.items():
        (root / rel).write_bytes(data)
    return root, [str(root / rel) for rel in bad]


def _class_of(img: torch.Tensor) -> torch.Tensor:
    """Normalized (N, 3, S, S) -> the class whose color is nearest to each image's mean color, (N,)."""
    rgb = img.mean(dim=(2, 3)) * torch.tensor(STD) + torch.tensor(MEAN)
    return torch.cdist(rgb, torch.tensor(COLORS, dtype=torch.float32)).argmin(dim=1)


def _check_labels(loader) -> list:
    """Every valid sample's label is its image's class; returns the (index, label) pairs seen."""
    seen = []
    for epoch in (0, 1):
        loader.set_epoch(epoch)
        for batch in loader:
            valid = batch['valid'].cpu()
            assert torch.equal(_class_of(batch['img'].cpu())[valid], batch['label'].cpu()[valid])
            seen += list(zip(batch['index'].cpu()[valid].tolist(), batch['label'].cpu()[valid].tolist()))
    return seen


@pytest.mark.parametrize('train', [True, False], ids=['train', 'eval'])
def test_torch_substitutes_carry_their_own_label(boundary_folder, train):
    root, bad = boundary_folder
    samples = folder_samples(root)
    loader = build_classification_loader(
        cfg(root, 'torch', workers=0), train=train, img_size=16, batch_size=4, drop_last=False, augment='probe'
    )
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')
        seen = _check_labels(loader)
    assert sorted(m.split(' (')[0] for m in loader.bad_files) == sorted(bad)
    # where each unreadable file stood, the label is the class of the image that replaced it
    at = {samples[i][0]: label for i, label in seen}
    assert [at[p] for p in bad] == [1, 2, 2, 0]
    assert [samples[i][1] for i in range(len(samples)) if samples[i][0] in bad] == [0, 1, 1, 2]


@pytest.mark.skipif(not dali_available(), reason='nvidia.dali is not installed')
def test_dali_stops_at_the_file_and_labels_the_clean_list_by_what_it_read(boundary_folder, tmp_path):
    root, bad = boundary_folder
    loader = build_classification_loader(
        cfg(root, 'dali', workers=1), train=True, img_size=16, batch_size=4, drop_last=False, augment='probe'
    )
    with pytest.raises(DataFileError) as e:
        _check_labels(loader)
    assert any(p in str(e.value) for p in bad)
    clean = tmp_path / 'clean.txt'
    scan_folder(str(root), str(clean), workers=1)
    for train in (True, False):
        loader = build_classification_loader(
            cfg(root, 'dali', workers=1, source='filelist', ann=str(clean)),
            train=train,
            img_size=16,
            batch_size=4,
            drop_last=False,
            augment='probe',
        )
        labels = sorted({label for _, label in _check_labels(loader)})
        assert labels == [0, 1, 2]
