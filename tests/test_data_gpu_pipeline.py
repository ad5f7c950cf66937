"""The torch_gpu pipeline (bytes in workers, batched decode and views on the device), on CPU tensors here; the CUDA
run against the CPU run when a GPU is present. The checks it shares with the other pipelines (geometry, rates,
sharding, resume, formats) run through data_helpers.PIPELINES in the other test_data_* files."""

from __future__ import annotations

import io
import os
import warnings

import numpy as np
import pytest
import torch
from PIL import Image

from cmae_ds.config import DataConfig
from cmae_ds.data import STD, build_classification_loader, build_pretrain_loader
from cmae_ds.data.pipelines.threads import (
    cores_per_rank,
    data_workers,
    default_data_workers,
    size_torch_threads,
    torch_threads,
)
from cmae_ds.data.pipelines.torch_gpu import decode_batch, jpeg_components, read_sample
from cmae_ds.data.views import batched as G

from data_helpers import cfg, coord_image, plant_bad_files, random_jpegs
from engine_helpers import run_python, tail

LEVELS = torch.tensor(STD).view(1, 3, 1, 1)  # normalized difference -> 0-255 levels


def _jpeg(img: Image.Image, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, 'JPEG', quality=90, **kw)
    return buf.getvalue()


def test_jpeg_components_reads_the_frame_header():
    rgb = Image.fromarray(np.random.default_rng(0).integers(0, 256, (40, 48, 3), dtype=np.uint8))
    assert jpeg_components(_jpeg(rgb)) == 3
    assert jpeg_components(_jpeg(rgb, progressive=True)) == 3
    assert jpeg_components(_jpeg(rgb.convert('L'))) == 1
    assert jpeg_components(_jpeg(rgb.convert('CMYK'))) == 4
    png = io.BytesIO()
    rgb.save(png, 'PNG')
    assert jpeg_components(png.getvalue()) == 0
    assert jpeg_components(b'') == 0 and jpeg_components(_jpeg(rgb)[:20]) == 0


def test_workers_send_rgb_jpeg_bytes_and_decode_everything_else(tmp_path):
    img = coord_image(64, 48)
    paths = {}
    for name, im, kw in [
        ('rgb.jpg', img, {}),
        ('cmyk.jpg', img.convert('CMYK'), {}),
        ('gray.jpg', img.convert('L'), {}),
        ('rgba.png', img.convert('RGBA'), {}),
    ]:
        paths[name] = tmp_path / name
        im.save(paths[name], **kw)
    assert read_sample(str(paths['rgb.jpg'])).dim() == 1  # encoded: for the batched decoder
    for name in ('cmyk.jpg', 'gray.jpg', 'rgba.png'):
        assert read_sample(str(paths[name])).shape == (3, 48, 64), name
    (tmp_path / 'text.jpg').write_text('not an image')
    with pytest.raises(Exception):  # noqa: B017 - whatever the decoders raise: the pipeline treats any as unreadable
        read_sample(str(tmp_path / 'text.jpg'))


def test_a_refused_jpeg_costs_only_itself(tmp_path):
    """One undecodable JPEG in the batch fails the batched call; the others are decoded one by one, it is None."""
    good = random_jpegs(tmp_path, 3, size=(40, 32))
    truncated = [p for p in plant_bad_files(tmp_path / 'c0', good[0]) if 'truncated' in p][0]
    data = [read_sample(p) for p in good[:2] + [truncated] + good[2:]]
    assert all(d.dim() == 1 for d in data)  # the truncated file still has its frame header: it reaches the decoder
    out = decode_batch(data, torch.device('cpu'))
    assert out[2] is None
    for p, img in zip(good, out[:2] + out[3:]):
        assert torch.equal(img, torch.from_numpy(np.array(Image.open(p).convert('RGB'))).permute(2, 0, 1))


def _pretrain_runs(pipelines, img_size, batch, epochs=1, **kw):
    runs = {}
    for p in pipelines:
        loader = build_pretrain_loader(
            DataConfig(pipeline=p, num_workers=1), img_size=img_size, batch_size=batch, debug=True, **kw
        )
        runs[p] = []
        for epoch in range(epochs):
            loader.set_epoch(epoch)
            runs[p] += list(loader)
    return runs


@pytest.mark.slow
def test_views_within_a_few_levels_of_the_torch_pipeline_on_the_shipped_photos():
    """Same draws, so equal decisions and boxes; pixels (0-255 levels) differ by the resampler's border handling
    (PIL reads past the crop box, a cropped tensor cannot) and, on jittered targets, by PIL's 8-bit HSV hue."""
    runs = _pretrain_runs(('torch', 'torch_gpu'), img_size=64, batch=32)
    on, clean, jit = [], [], []
    for a, b in zip(runs['torch'], runs['torch_gpu']):
        assert torch.equal(a['index'], b['index'])
        for k in a['debug']:
            assert torch.equal(a['debug'][k], b['debug'][k]), k
        d = a['debug']
        on.append(((a['img'] - b['img']) * LEVELS).abs().flatten())
        tg = ((a['img_target'] - b['img_target']) * LEVELS).abs()
        clean.append(tg[~(d['jitter'] | d['gray'] | d['blur'])].flatten())
        jit.append(tg[d['jitter'] & ~d['gray'] & ~d['blur']].flatten())
    on, clean, jit = torch.cat(on), torch.cat(clean), torch.cat(jit)
    assert on.mean() < 0.5 and on.quantile(0.99) <= 2
    assert clean.mean() < 0.5 and clean.quantile(0.99) <= 2
    assert jit.mean() < 3 and jit.quantile(0.99) <= 12


def test_color_jitter_applies_each_samples_ops_in_its_drawn_order():
    """Against torchvision's tensor ops, one sample at a time in the drawn order (up to the per-op rounding)."""
    import torchvision.transforms.functional as tvF

    gen = torch.Generator().manual_seed(0)
    x = torch.rand((6, 3, 20, 24), generator=gen) * 255
    factors = np.array([[1.3, 0.7, 1.2, 0.05], [0.8, 1.4, 0.6, -0.08], [1.1, 1.0, 0.7, 0.1]] * 2)
    order = np.array([[0, 1, 2, 3], [3, 2, 1, 0], [2, 0, 3, 1], [1, 3, 0, 2], [0, 2, 1, 3], [3, 0, 2, 1]])
    jitter = np.array([True, True, True, True, True, False])
    got = G.color_jitter(x.round().clone(), jitter, factors, order)
    ops = (tvF.adjust_brightness, tvF.adjust_contrast, tvF.adjust_saturation, tvF.adjust_hue)
    for i in range(6):
        want = x[i].round() / 255
        if jitter[i]:
            for j in order[i]:
                want = ops[j](want, float(factors[i, j]))
        assert (got[i] - want * 255).abs().max() < 4, i  # four ops, each rounded to levels here


def test_gaussian_blur_is_torchvisions_per_sample_sigma():
    import torchvision.transforms.functional as tvF

    x = torch.rand((3, 3, 30, 30), generator=torch.Generator().manual_seed(1)) * 255
    sigma = np.array([0.3, 1.0, 2.0])
    got = G.gaussian_blur(x.clone(), np.array([True, False, True]), sigma)
    k = 2 * G.BLUR_RADIUS + 1
    assert (got[0] - tvF.gaussian_blur(x[0], [k, k], [0.3, 0.3]).round()).abs().max() <= 1
    assert torch.equal(got[1], x[1])
    assert (got[2] - tvF.gaussian_blur(x[2], [k, k], [2.0, 2.0]).round()).abs().max() <= 1


@pytest.fixture
def bad_class(tmp_path):
    """Class c0 readable, class c1 (label 1) made of unreadable files only: a substitute always comes from c0."""
    good = random_jpegs(tmp_path, 6, classes=1, size=(40, 32))
    (tmp_path / 'c1').mkdir()
    bad = plant_bad_files(tmp_path / 'c1', good[0])
    return tmp_path, good, bad


@pytest.mark.parametrize('pipeline', ['torch_gpu', 'torch'])
def test_unreadable_files_are_skipped_and_labels_follow_the_images(bad_class, pipeline):
    root, good, bad = bad_class
    loader = build_classification_loader(cfg(root, pipeline, workers=1), train=False, img_size=16, batch_size=4)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter('always')
        batches = list(loader)
    assert sum(len(b['index']) for b in batches) == len(good) + len(bad)  # batches keep their size
    assert all((b['label'] == 0).all() for b in batches)  # every c1 sample became a c0 image, with its label
    assert loader.num_bad_files == len(bad)
    assert sorted(m.split(' (')[0] for m in loader.bad_files) == sorted(bad)
    warned = ' '.join(str(w.message) for w in caught)
    assert all(p in warned for p in bad)


@pytest.mark.parametrize('augment', ['finetune', 'probe'])
def test_classification_training_views_resume_exactly(tmp_path, augment):
    random_jpegs(tmp_path, 12, classes=3, size=(64, 48))
    loader = build_classification_loader(
        cfg(tmp_path, 'torch_gpu', workers=1), train=True, img_size=32, batch_size=4, seed=3, augment=augment
    )
    loader.set_epoch(1)
    full = list(loader)
    loader.skip_batches(1)
    resumed = list(loader)
    assert len(resumed) == len(full) - 1
    for a, b in zip(full[1:], resumed):
        assert torch.equal(a['index'], b['index']) and torch.equal(a['img'], b['img'])
        assert torch.equal(a['label'], b['label'])


def test_auto_takes_torch_gpu_on_a_cuda_device_without_dali(monkeypatch):
    from cmae_ds.data.pipelines import build

    monkeypatch.setattr(build, 'dali_available', lambda: False)
    assert build.resolve_pipeline('auto', 'cuda') == 'torch_gpu'
    assert build.resolve_pipeline('auto', 'cpu') == 'torch'
    monkeypatch.setattr(build, 'dali_available', lambda: True)
    assert build.resolve_pipeline('auto', 'cuda') == 'dali'
    with pytest.raises(ValueError, match='torch_gpu'):
        build.resolve_pipeline('pil', 'cpu')


def test_threads_sized_to_the_cores_of_a_rank(monkeypatch):
    cpus = len(os.sched_getaffinity(0))
    monkeypatch.delenv('LOCAL_SIZE', raising=False)
    monkeypatch.setenv('LOCAL_WORLD_SIZE', '1')
    assert cores_per_rank() == cpus
    monkeypatch.setenv('LOCAL_WORLD_SIZE', str(2 * cpus))
    assert cores_per_rank() == 1  # never 0
    assert data_workers(3, 'cpu') == 3  # an explicit data.num_workers wins
    assert data_workers(-1, 'cpu') == 1
    # a rank never asks for more threads than its cores: model threads + data threads
    for cores in (2, 4, 16):
        assert torch_threads('cpu', cores) + default_data_workers('cpu', cores) == cores
    assert torch_threads('cuda', 16) == 16
    saved = torch.get_num_threads()
    try:
        monkeypatch.setenv('OMP_NUM_THREADS', '3')
        torch.set_num_threads(3)
        assert size_torch_threads('cpu') == 3  # explicit: left alone
        monkeypatch.delenv('OMP_NUM_THREADS')
        monkeypatch.setenv('LOCAL_WORLD_SIZE', '1')
        assert size_torch_threads('cpu') == torch.get_num_threads() == max(1, cpus - max(1, cpus // 4))
    finally:
        torch.set_num_threads(saved)


@pytest.mark.slow
@pytest.mark.parametrize('mode', ['data', 'e2e'])
def test_benchmark_runs_on_torch_gpu(tmp_path, mode):
    import json

    out = tmp_path / 'bench.json'
    proc = run_python(
        [
            'launch/benchmark.py',
            '--mode',
            mode,
            '--out',
            str(out),
            '--warmup',
            '1',
            '--steps',
            '2',
            'model.img_size=32',
            'model.patch_size=8',
            'train.progress_bar=false',
            'data.pipeline=torch_gpu',
            'data.num_workers=1',
        ]
    )
    assert proc.returncode == 0, tail(proc)
    [row] = json.loads(out.read_text())
    assert row['error'] is None and row['extra']['data'] == 'torch_gpu-cpu'
    assert row['images_per_s_per_device'] > 0


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason='needs a CUDA device')
def test_cuda_run_makes_the_cpu_runs_views(tmp_path):
    """The same graph on CUDA (nvJPEG, CUDA kernels) and on CPU tensors: equal decisions and boxes; pixels within
    nvJPEG-vs-libjpeg-turbo and kernel rounding. Photos, a CMYK JPEG and a PNG, so both decode paths join."""
    random_jpegs(tmp_path, 30, size=(120, 90))
    coord_image(100, 80).convert('CMYK').save(tmp_path / 'c0' / 'cmyk.jpg')
    coord_image(100, 80).save(tmp_path / 'c1' / 'coord.png')
    got = {}
    for device in ('cpu', 'cuda'):
        loader = build_pretrain_loader(
            cfg(tmp_path, 'torch_gpu', workers=2), img_size=64, batch_size=32, device=device, debug=True
        )
        loader.set_epoch(0)
        got[device] = next(iter(loader))
    cpu, gpu = got['cpu'], got['cuda']
    assert gpu['img'].is_cuda and gpu['img_target'].is_cuda
    for k in cpu['debug']:
        assert torch.equal(cpu['debug'][k], gpu['debug'][k].cpu()), k
    for key in ('img', 'img_target'):
        diff = ((cpu[key] - gpu[key].cpu()) * LEVELS).abs()
        assert diff.mean() < 1 and diff.max() < 12, key
