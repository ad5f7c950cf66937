"""Planted unreadable files: the scanner finds exactly them, DALI stops naming the file, torch skips and counts."""

from __future__ import annotations

import subprocess
import sys
import warnings
from pathlib import Path

import pytest

from cmae_ds.data import build_pretrain_loader
from cmae_ds.data.pipelines.dali import DataFileError
from cmae_ds.data.sources.files import filelist_samples
from cmae_ds.data.sources.scan import scan_folder

from data_helpers import cfg, plant_bad_files, random_jpegs

REPO = Path(__file__).resolve().parents[1]
KINDS = ('truncated', 'corrupt', 'text', 'empty')


@pytest.fixture
def dirty(tmp_path):
    good = random_jpegs(tmp_path, 12, size=(40, 32))
    bad = plant_bad_files(tmp_path / 'c1', good[0])
    return tmp_path, good, bad


def test_scanner_finds_every_bad_file_and_nothing_else(dirty, tmp_path_factory):
    root, good, bad = dirty
    out = tmp_path_factory.mktemp('scan') / 'clean.txt'
    result = scan_folder(str(root), str(out), workers=2)
    assert sorted(p for p, _ in result.bad) == sorted(bad)
    assert sorted(p for p, _ in filelist_samples(out, str(root))) == sorted(good)
    report = Path(f'{out}.bad.txt').read_text().splitlines()
    assert sorted(line.split('\t')[0] for line in report) == sorted(bad)


def test_scan_dataset_cli(dirty, tmp_path_factory):
    root, good, bad = dirty
    out = tmp_path_factory.mktemp('cli') / 'clean.txt'
    res = subprocess.run(
        [sys.executable, str(REPO / 'launch/scan_dataset.py'), str(root), '--out', str(out), '--workers', '2'],
        capture_output=True,
        text=True,
        check=True,
    )
    assert f'{len(good)} readable' in res.stdout and f'{len(bad)} unreadable' in res.stdout
    # the clean list is a valid 'filelist' source with the folder labels
    labels = [lab for _, lab in filelist_samples(out, str(root))]
    assert sorted(set(labels)) == [0, 1]


@pytest.mark.parametrize('kind', KINDS)
def test_dali_error_names_the_file(tmp_path, kind):
    good = random_jpegs(tmp_path, 6, size=(40, 32))
    bad = [p for p in plant_bad_files(tmp_path / 'c0', good[0]) if Path(p).stem == kind]
    for p in (tmp_path / 'c0').glob('*.jpg'):
        if Path(p).stem in KINDS and str(p) not in bad:
            p.unlink()
    loader = build_pretrain_loader(cfg(tmp_path, 'dali'), img_size=16, batch_size=3, drop_last=False)
    with pytest.raises(DataFileError, match=bad[0].replace('.', r'\.')):
        list(loader)


def test_torch_pipeline_skips_and_counts(dirty):
    root, good, bad = dirty
    loader = build_pretrain_loader(cfg(root, 'torch'), img_size=16, batch_size=4, drop_last=False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter('always')
        batches = list(loader)
    assert sum(len(b['index']) for b in batches) == len(good) + len(bad)  # batches keep their size
    assert loader.num_bad_files == len(bad)
    assert sorted(m.split(' (')[0] for m in loader.bad_files) == sorted(bad)
    warned = ' '.join(str(w.message) for w in caught)
    assert all(p in warned for p in bad)
