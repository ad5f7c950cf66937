"""data.source=shards: packing, reading by index on every pipeline, resume, and damaged or foreign shards."""

from __future__ import annotations

import io
import logging
import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from cmae_ds.data import build_classification_loader, build_pretrain_loader, list_samples
from cmae_ds.data.sources import packing, shard_index
from cmae_ds.data.sources.files import DataFileError
from cmae_ds.data.sources.packing import PackError, pack
from cmae_ds.data.sources.scan import scan_shards
from cmae_ds.data.sources.shard_index import INDEX_NAME, ShardError

from data_helpers import PIPELINES, cfg, random_jpegs

REPO = Path(__file__).resolve().parents[1]
N = 23
SHARD_BYTES = 20_000  # 4 of the 48x40 JPEGs a shard: 6 shards


@pytest.fixture(scope='module')
def packed(tmp_path_factory):
    root = tmp_path_factory.mktemp('folder')
    random_jpegs(root, N, size=(48, 40))
    out = tmp_path_factory.mktemp('shards') / 'out'
    pack(list_samples(cfg(root, 'torch')), out, SHARD_BYTES, workers=2, progress=False)
    return root, out


def shards_cfg(root, pipeline='torch'):
    return cfg(root, pipeline, source='shards')


def test_packing_round_trip_bytes_labels_and_layout(packed):
    folder, out = packed
    files, shards = list_samples(cfg(folder, 'torch')), list_samples(shards_cfg(out))
    assert len(shards) == N and len({s['name'] for s in shards.index.shards}) > 1
    for i, (path, label) in enumerate(files):
        assert shards.read(i) == Path(path).read_bytes() and shards[i][1] == label
    # plain webdataset: '<key>.jpg' then '<key>.cls' holding the label, readable by the standard tarfile module
    with tarfile.open(out / 'shard-000001.tar') as tf:
        names = tf.getnames()
        assert names[:2] == ['000000004_0004.jpg', '000000004_0004.cls']
        assert tf.extractfile(names[1]).read() == str(files[4][1]).encode()


def test_packing_is_deterministic_and_resumes(packed, tmp_path, monkeypatch):
    """An interrupted packing (shard 3 fails) is finished by a rerun that writes only the missing shards; with
    another worker count every byte is the same."""
    folder, out = packed
    samples = list_samples(cfg(folder, 'torch'))
    real = packing.write_shard
    monkeypatch.setattr(packing, 'write_shard', _fail_on_shard_3)  # the pool forks: the workers see it
    with pytest.raises(PackError, match='make_shards: disk went away'):
        pack(samples, tmp_path / 'out', SHARD_BYTES, workers=1, progress=False)
    assert not (tmp_path / 'out' / INDEX_NAME).exists()
    monkeypatch.setattr(packing, 'write_shard', real)
    _, written = pack(samples, tmp_path / 'out', SHARD_BYTES, workers=1, progress=False)
    assert written == 1  # the failed shard only
    for name in sorted(p.name for p in out.glob('*.tar')):
        assert (tmp_path / 'out' / name).read_bytes() == (out / name).read_bytes(), name
    assert sorted(os.listdir(tmp_path / 'out')) == sorted(os.listdir(out))
    assert pack(samples, tmp_path / 'out', SHARD_BYTES, workers=1, progress=False)[1] == 0  # done: nothing to do


def _fail_on_shard_3(path, items):
    if path.endswith('shard-000003.tar'):
        raise OSError('disk went away')
    return _WRITE_SHARD(path, items)


_WRITE_SHARD = packing.write_shard


def test_packing_refuses_a_folder_holding_something_else(packed, tmp_path):
    folder, out = packed
    samples = list_samples(cfg(folder, 'torch'))
    with pytest.raises(PackError, match='another dataset'):
        pack(samples[:-1], out, SHARD_BYTES, progress=False)
    (tmp_path / 'notes.txt').write_text('mine')
    with pytest.raises(PackError, match='not empty'):
        pack(samples, tmp_path, SHARD_BYTES, progress=False)


@pytest.mark.parametrize('pipeline', PIPELINES)
def test_views_from_shards_equal_views_from_the_folder(packed, pipeline):
    folder, out = packed
    kw = dict(img_size=16, batch_size=4, rank=1, world_size=2, seed=3, drop_last=False)
    a = build_pretrain_loader(cfg(folder, pipeline), **kw)
    b = build_pretrain_loader(shards_cfg(out, pipeline), **kw)
    for loader in (a, b):
        loader.set_epoch(1)
    a, b = list(a), list(b)
    assert len(a) == len(b) > 1
    for x, y in zip(a, b):
        assert torch.equal(x['index'], y['index'])
        assert torch.equal(x['img'], y['img']) and torch.equal(x['img_target'], y['img_target'])
    kw = dict(img_size=16, batch_size=4)
    ev_a = list(build_classification_loader(cfg(folder, pipeline), train=False, **kw))
    ev_b = list(build_classification_loader(shards_cfg(out, pipeline), train=False, **kw))
    for x, y in zip(ev_a, ev_b):
        assert torch.equal(x['label'], y['label']) and torch.equal(x['img'], y['img'])


@pytest.mark.parametrize('pipeline', PIPELINES)
def test_mid_epoch_resume_is_exact(packed, pipeline):
    _, out = packed
    kw = dict(img_size=16, batch_size=2, drop_last=True, seed=5)
    full = build_pretrain_loader(shards_cfg(out, pipeline), **kw)
    full.set_epoch(2)
    full = list(full)
    resumed = build_pretrain_loader(shards_cfg(out, pipeline), **kw)
    resumed.set_epoch(2)
    resumed.skip_batches(3)
    resumed = list(resumed)
    assert len(resumed) == len(full) - 3
    for x, y in zip(full[3:], resumed):
        assert torch.equal(x['index'], y['index']) and torch.equal(x['img_target'], y['img_target'])


def _copy(out: Path, tmp: Path) -> Path:
    dst = tmp / 'copy'
    shutil.copytree(out, dst)
    return dst


def test_a_truncated_shard_stops_with_one_line_naming_it_and_the_key(packed, tmp_path):
    root = _copy(packed[1], tmp_path)
    shard = root / 'shard-000002.tar'
    with tarfile.open(shard) as tf:
        first = tf.getmembers()[0]
    shard.write_bytes(shard.read_bytes()[: first.offset_data + first.size // 2])
    with pytest.raises(ShardError) as err:
        list_samples(shards_cfg(root))
    msg = str(err.value)
    assert '\n' not in msg and str(shard) in msg and 'truncated at key 000000008_0008' in msg
    proc = subprocess.run(
        [sys.executable, str(REPO / 'launch/scan_dataset.py'), str(root)], capture_output=True, text=True
    )
    assert proc.returncode != 0 and proc.stderr.strip().splitlines() == [f'error: {msg}']


def test_a_touched_shard_is_checksummed_and_a_missing_one_refused(packed, tmp_path, caplog):
    """Another mtime with the same bytes (a copy that did not keep times) costs one checksum, not a new walk."""
    root = _copy(packed[1], tmp_path)
    shard = root / 'shard-000004.tar'
    os.utime(shard, ns=(1, 10**18))
    with caplog.at_level(logging.WARNING):
        assert len(list_samples(shards_cfg(root))) == N
    assert 'new mtimes and unchanged checksums' in caplog.text and 'indexing them again' not in caplog.text
    index = shard_index.read_index(root / INDEX_NAME)
    assert [s['mtime_ns'] for s in index.shards if s['name'] == shard.name] == [10**18]
    shard.unlink()
    with pytest.raises(ShardError, match=f'{shard}: listed in the index .* but missing'):
        list_samples(shards_cfg(root))


def test_a_corrupt_header_stops_naming_the_shard_and_the_key_before_it(packed, tmp_path):
    root = _copy(packed[1], tmp_path)
    shard = root / 'shard-000001.tar'
    data = bytearray(shard.read_bytes())
    with tarfile.open(shard) as tf:
        third = tf.getmembers()[2].offset  # the header of the second sample's image
    data[third : third + 100] = b'x' * 100
    shard.write_bytes(bytes(data))
    with pytest.raises(ShardError, match=r'shard-000001.tar: corrupt tar header at byte \d+, after key 000000004'):
        list_samples(shards_cfg(root))


@pytest.mark.parametrize('pipeline', PIPELINES)
def test_a_corrupt_record_is_skipped_and_reported_like_a_bad_file(packed, tmp_path, pipeline, caplog):
    root = _copy(packed[1], tmp_path)
    shards = list_samples(shards_cfg(root))
    bad = 9
    shard = Path(shards[bad][0].split(':')[0])
    off, size = int(shards.index.offset[bad]), int(shards.index.size[bad])
    data = bytearray(shard.read_bytes())
    data[off + 200 : off + size] = bytes(np.random.default_rng(1).integers(0, 256, size - 200, dtype=np.uint8))
    shard.write_bytes(bytes(data))
    with caplog.at_level(logging.WARNING):
        loader = build_pretrain_loader(shards_cfg(root, pipeline), img_size=16, batch_size=N, drop_last=False)
    assert 'size or checksum differ' in caplog.text  # the stale index was noticed, not used
    if pipeline == 'dali':  # as with a bad file: DALI stops, naming it
        with pytest.raises(DataFileError, match=f'cannot decode {shards[bad][0]}'):
            list(loader)
        return
    with pytest.warns(UserWarning, match='skipped unreadable file'):
        (batch,) = list(loader)
    assert [m.split(' (')[0] for m in loader.bad_files] == [shards[bad][0]]
    assert len(batch['img']) == N
    result = scan_shards(str(root), workers=1)
    assert [p for p, _ in result.bad] == [shards[bad][0]] and len(result.good) == N - 1


def _foreign_tar(path: Path, items: list[tuple[str, bytes]]) -> None:
    with tarfile.open(path, 'w') as tf:
        for name, blob in items:
            info = tarfile.TarInfo(name)
            info.size = len(blob)
            tf.addfile(info, io.BytesIO(blob))


def _foreign(tmp: Path) -> tuple[Path, list]:
    """Two tars as img2dataset-like tools write them: keys with folders, .json and .txt beside the image, a PNG,
    a key without a label and one without an image."""
    rng = np.random.default_rng(0)
    imgs = []
    for fmt in ('JPEG', 'PNG', 'JPEG', 'JPEG'):
        buf = io.BytesIO()
        Image.fromarray(rng.integers(0, 256, (20, 24, 3), dtype=np.uint8)).save(buf, fmt)
        imgs.append(buf.getvalue())
    root = tmp / 'foreign'
    root.mkdir()
    _foreign_tar(
        root / 'a.tar',
        [('d/k0.jpg', imgs[0]), ('d/k0.cls', b'3\n'), ('d/k0.json', b'{}'), ('d/k1.txt', b'caption only')]
        + [('d/k2.png', imgs[1]), ('d/k2.cls', b'1')],
    )
    _foreign_tar(root / 'b.tar', [('k3.json', b'{}'), ('k3.jpg', imgs[2]), ('k4.jpg', imgs[3])])
    return root, [(imgs[0], 3), (imgs[1], 1), (imgs[2], -1), (imgs[3], -1)]


def test_foreign_tars_are_indexed_on_first_use_and_the_index_kept(tmp_path, caplog):
    root, expected = _foreign(tmp_path)
    with caplog.at_level(logging.WARNING):
        samples = list_samples(shards_cfg(root))
    assert 'without an index' in caplog.text and (root / INDEX_NAME).is_file()
    assert [(samples.read(i), samples[i][1]) for i in range(len(samples))] == expected
    caplog.clear()
    with caplog.at_level(logging.INFO):
        again = list_samples(shards_cfg(root))
    assert caplog.text == '' and list(again) == list(samples)
    (batch,) = list(build_classification_loader(shards_cfg(root), train=False, img_size=16, batch_size=4))
    assert batch['label'].tolist() == [3, 1, -1, -1]


def test_a_read_only_shard_folder_gets_its_index_from_the_user_cache(tmp_path, monkeypatch):
    """Root ignores permission bits, so under root the folder's write test is what says read-only."""
    root, expected = _foreign(tmp_path)
    monkeypatch.setenv('XDG_CACHE_HOME', str(tmp_path / 'cache'))
    os.chmod(root, 0o555)
    if os.geteuid() == 0:
        monkeypatch.setattr(shard_index, 'writable', lambda folder: False)
    try:
        samples = list_samples(shards_cfg(root))
        assert not (root / INDEX_NAME).exists()
        cached = shard_index.cached_index_path(root)
        assert cached.is_file() and str(cached).startswith(str(tmp_path / 'cache'))
        assert [(samples.read(i), samples[i][1]) for i in range(len(samples))] == expected
        stamp = cached.stat().st_mtime_ns
        assert len(list_samples(shards_cfg(root))) == len(expected) and cached.stat().st_mtime_ns == stamp
    finally:
        os.chmod(root, 0o755)


@pytest.mark.slow
@pytest.mark.dist
def test_training_from_shards_on_two_ranks_resumes_on_one(tmp_path, packed):
    """MAE on 2 ranks from shards, its step 2 resumed on 1 rank x accumulation 2: the run continues like the
    uninterrupted one (test_elastic.py's check, with data.source=shards)."""
    from test_elastic import _assert_continues, _assert_equal, _copy_checkpoint, _run

    out = packed[1]
    data = ['model.mode=mae', 'data.source=shards', f'data.root={out}', 'data.pipeline=torch', 'data.num_workers=0']
    _, a = _run(tmp_path, 'A', 2, 2, 1, tmp_path / 'A', ['train.max_steps=4', *data], record='2,4')
    _copy_checkpoint(tmp_path / 'A', 'step_00000002', tmp_path / 'B')
    _, b = _run(tmp_path, 'B', 1, 2, 2, tmp_path / 'B', ['train.max_steps=2', *data], record='4')
    _assert_equal(b[2], a[2])
    _assert_continues(b[4], a[4], a[2], ('online',), 'shards: MAE 2 ranks -> 1 rank x accumulation 2')


def test_knn_evaluation_reads_labels_from_the_shards(tmp_path):
    """The classification tasks take a DataConfig: kNN on shards equals kNN on the folders they were packed from."""
    from cmae_ds.config import DataConfig, KnnConfig, ModelConfig
    from cmae_ds.models import CMAE
    from cmae_ds.tasks.knn import KnnEvaluator, mean_patch_features

    from finetune_helpers import write_class_folder

    results = {}
    folders = [write_class_folder(tmp_path / s, [8] * 4, seed=k) for k, s in enumerate(('train', 'val'))]
    for f in folders:
        pack(list_samples(cfg(f, 'torch')), f.with_name(f.name + '_shards'), workers=1, progress=False)
    encoder = CMAE(ModelConfig(size='debug', img_size=32, patch_size=8, decoder_depth=1)).encoder.eval()
    for source, suffix in (('folder', ''), ('shards', '_shards')):
        train, val = (DataConfig(source=source, root=f'{f}{suffix}', pipeline='torch', num_workers=0) for f in folders)
        evaluator = KnnEvaluator(KnnConfig(batch_size=16), train, val, 32, 0, 1, torch.device('cpu'))
        results[source] = (evaluator.num_classes, evaluator(mean_patch_features(encoder)))
    assert results['shards'][0] == 4 and results['shards'] == results['folder']
    assert results['shards'][1].top1 >= 90
