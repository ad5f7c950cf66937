"""Sources (folder, official JSON, mmengine JSON, file list, embedded, synthetic) and pipeline selection."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from cmae_ds.config import DataConfig
from cmae_ds.data import DataSourceError, build_pretrain_loader, list_samples, resolve_pipeline
from cmae_ds.data.sources.files import embedded_samples

from data_helpers import cfg, random_jpegs

REPO = Path(__file__).resolve().parents[1]


def test_folder_labels_by_sorted_class(tmp_path):
    paths = random_jpegs(tmp_path, 6, classes=3, size=(20, 20))
    samples = list_samples(cfg(tmp_path, 'torch'))
    assert [p for p, _ in samples] == paths
    assert [lab for _, lab in samples] == [0, 0, 1, 1, 2, 2]


def test_make_annotations_roundtrip_official_json(tmp_path):
    train = tmp_path / 'ImageNet' / 'train'
    random_jpegs(train, 6, classes=2, size=(20, 20))
    ann = tmp_path / 'ImageNet' / 'ImageNet_train.json'
    subprocess.run(
        [sys.executable, str(REPO / 'launch/make_annotations.py'), str(train), str(ann), '--prefix', 'train'],
        check=True,
        capture_output=True,
    )
    entries = json.loads(ann.read_text())
    assert set(entries[0]) == {'prefix', 'filename', 'label'} and entries[0]['prefix'] == 'train'
    # the official configs name the annotation file relative to data_root
    from_json = list_samples(DataConfig(source='json', root=str(tmp_path / 'ImageNet'), ann_file='ImageNet_train.json'))
    assert from_json == list_samples(cfg(train, 'torch'))


def test_mmengine_json_and_filelist(tmp_path):
    paths = random_jpegs(tmp_path, 4, classes=2, size=(20, 20))
    rel = [str(Path(p).relative_to(tmp_path)) for p in paths]
    mm = {
        'metainfo': {'classes': ['c0', 'c1']},
        'data_list': [{'img_path': r, 'gt_label': i % 2} for i, r in enumerate(rel)],
    }
    (tmp_path / 'mm.json').write_text(json.dumps(mm))
    assert list_samples(DataConfig(source='json', root=str(tmp_path), ann_file=str(tmp_path / 'mm.json'))) == [
        (p, i % 2) for i, p in enumerate(paths)
    ]
    (tmp_path / 'list.txt').write_text(f'# comment\n{rel[0]} 5\n\n{rel[1]}\n{paths[2]}\t1\n')
    assert list_samples(DataConfig(source='filelist', root=str(tmp_path), ann_file=str(tmp_path / 'list.txt'))) == [
        (paths[0], 5),
        (paths[1], -1),
        (paths[2], 1),
    ]


def test_errors_name_the_file(tmp_path):
    with pytest.raises(DataSourceError, match='nope.json'):
        list_samples(DataConfig(source='json', ann_file=str(tmp_path / 'nope.json')))
    (tmp_path / 'bad.json').write_text('{"x": 1}')
    with pytest.raises(DataSourceError, match='bad.json'):
        list_samples(DataConfig(source='json', ann_file=str(tmp_path / 'bad.json')))
    with pytest.raises(DataSourceError, match='no images'):
        list_samples(DataConfig(source='folder', root=str(tmp_path)))


def test_embedded_photos_shipped():
    samples = embedded_samples()
    assert 64 <= len(samples) <= 200
    assert sum(Path(p).stat().st_size for p, _ in samples) < 4e6
    readme = (Path(samples[0][0]).parent / 'README.md').read_text()
    assert 'CC0' in readme and 'public domain' in readme
    loader = build_pretrain_loader(DataConfig(num_workers=0, pipeline='torch'), img_size=32, batch_size=16)
    assert len(loader) == len(samples) // 16
    assert next(iter(loader))['img'].shape == (16, 3, 32, 32)


def test_synthetic_deterministic_on_device():
    c = DataConfig(source='synthetic')
    a = build_pretrain_loader(c, img_size=16, batch_size=2, seed=1)
    assert a.name == 'synthetic'
    a.skip_batches(3)
    x = next(iter(a))
    a.skip_batches(3)
    assert torch.equal(x['img'], next(iter(a))['img']) and x['img_target'].shape == (2, 3, 16, 16)


def test_pipeline_choice():
    assert resolve_pipeline('auto') == 'dali'  # DALI is installed in this environment
    assert resolve_pipeline('torch') == 'torch'
    loader = build_pretrain_loader(DataConfig(pipeline='auto', num_workers=1), img_size=32, batch_size=8)
    assert loader.name == 'dali-cpu'


def test_without_dali_auto_falls_back_to_torch(monkeypatch):
    from cmae_ds.data.pipelines import build

    monkeypatch.setattr(build, 'dali_available', lambda: False)
    assert resolve_pipeline('auto') == 'torch'
    with pytest.raises(ImportError, match='dali'):
        resolve_pipeline('dali')
    assert build_pretrain_loader(DataConfig(num_workers=0), img_size=32, batch_size=8).name == 'torch'
