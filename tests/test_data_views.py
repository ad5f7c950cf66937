"""docs/spec.md section 7 geometry and augmentation rates, the same checks on the torch and the DALI CPU pipeline."""

from __future__ import annotations

import math

import pytest
import torch

from cmae_ds.data import MEAN, STD, build_pretrain_loader

from data_helpers import PIPELINES, cfg, coord_image, solid_image, write_folder

S, EXTRA, EPOCHS = 32, 8, 8  # master 40; 8 epochs x 64 images = 512 samples per pipeline


@pytest.fixture(scope='module')
def coord_root(tmp_path_factory):
    root = tmp_path_factory.mktemp('coord')
    write_folder(root, {'wide': [coord_image(160, 120)] * 32, 'tall': [coord_image(120, 160)] * 32})
    return root


# torch_gpu on CPU tensors: 512 samples of many small ops take 4-12 s in the test process on this shared 2-core
# machine; its decisions and pixels are compared with torch's in the fast suite below.
@pytest.fixture(
    scope='module', params=[pytest.param(p, marks=pytest.mark.slow) if p == 'torch_gpu' else p for p in PIPELINES]
)
def views(request, coord_root):
    """All samples of EPOCHS epochs: dict of online (N,3,S,S), target (N,3,S,S), debug decisions (N,)."""
    loader = build_pretrain_loader(cfg(coord_root, request.param, extra=EXTRA), img_size=S, batch_size=64, debug=True)
    batches = []
    for epoch in range(EPOCHS):
        loader.set_epoch(epoch)
        batches += list(loader)
    out = {k: torch.cat([b[k] for b in batches]) for k in ('img', 'img_target')}
    out['debug'] = {k: torch.cat([b['debug'][k] for b in batches]) for k in batches[0]['debug']}
    out['name'] = loader.name
    return out


def _shift_diff(views) -> torch.Tensor:
    """(N,) max |target[:, :S-dy, :S-dx] - online[:, dy:, dx:]| in 0-255 units."""
    on, tg, d = views['img'], views['img_target'], views['debug']
    std = torch.tensor(STD).view(3, 1, 1)
    diffs = []
    for i in range(len(on)):
        dy, dx = int(d['dy'][i]), int(d['dx'][i])
        diffs.append(((tg[i, :, : S - dy, : S - dx] - on[i, :, dy:, dx:]) * std).abs().amax())
    return torch.stack(diffs)


def _rate_ok(flags: torch.Tensor, p: float, sigmas: float = 4.0) -> bool:
    n = len(flags)
    return abs(flags.float().mean().item() - p) <= sigmas * math.sqrt(p * (1 - p) / n)


def test_shapes_dtype(views):
    assert views['img'].shape == views['img_target'].shape == (64 * EPOCHS, 3, S, S)
    assert views['img'].dtype == views['img_target'].dtype == torch.float32


def test_target_is_master_window_at_offset(views):
    """Without color ops, the target equals the online view (the master at (0, 0)) moved by (dy, dx): both are
    windows of one master. Exact, since no resampling happens between them."""
    d = views['debug']
    clean = ~(d['jitter'] | d['gray'] | d['blur'])
    assert clean.sum() >= 15
    assert _shift_diff(views)[clean].max().item() < 1e-3


def test_offsets_uniform(views):
    dy, dx = views['debug']['dy'], views['debug']['dx']
    assert dy.min() >= 0 and dx.min() >= 0 and dy.max() <= EXTRA - 1 and dx.max() <= EXTRA - 1
    n = len(dy)
    for v in (dy, dx):
        counts = torch.bincount(v, minlength=EXTRA).double()
        chi2 = (((counts - n / EXTRA) ** 2) / (n / EXTRA)).sum().item()
        assert chi2 < 24.3, f'offset histogram {counts.tolist()} not uniform (chi2 {chi2:.1f}, p < 0.001)'
    pair = torch.bincount(dy * EXTRA + dx, minlength=EXTRA * EXTRA)
    assert (pair > 0).float().mean() > 0.9  # the (dy, dx) grid is covered, not just its marginals


def test_flip_rate_inferred_from_pixels(views):
    """Red encodes x: it grows to the right unless the master was flipped."""
    red = views['img'][:, 0]
    slope = red[:, :, S // 2 :].mean((1, 2)) - red[:, :, : S // 2].mean((1, 2))
    flipped = slope < 0
    assert torch.equal(flipped, views['debug']['flip'])
    assert _rate_ok(flipped, 0.5)


def test_crop_scale_range(views):
    """The master covers 20-100 % of the image area: its x- and y-extent in source pixels, read off the
    coordinate-encoded red and green channels of the online view, give the area (tolerant of resampling)."""
    img = views['img'] * torch.tensor(STD).view(1, 3, 1, 1) + torch.tensor(MEAN).view(1, 3, 1, 1)
    fx = (img[:, 0, :, -1] - img[:, 0, :, 0]).abs().mean(1) / 255 * (S + EXTRA) / (S - 1)
    fy = (img[:, 1, -1, :] - img[:, 1, 0, :]).abs().mean(1) / 255 * (S + EXTRA) / (S - 1)
    area = fx * fy
    assert area.min() > 0.15 and area.max() < 1.1
    assert area.mean() > 0.45  # uniform on (0.2, 1) has mean 0.6


@pytest.mark.parametrize('key,p', [('jitter', 0.8), ('gray', 0.2), ('blur', 0.5)])
def test_color_op_rates(views, key, p):
    assert _rate_ok(views['debug'][key], p)


def test_grayscale_from_pixels(views):
    """Grayscale targets have three equal channels (within one level); the others do not."""
    tg = views['img_target'] * torch.tensor(STD).view(1, 3, 1, 1) + torch.tensor(MEAN).view(1, 3, 1, 1)
    spread = (tg.amax(1) - tg.amin(1)).amax((1, 2))
    gray = views['debug']['gray']
    assert spread[gray].max() <= 1.01
    assert spread[~gray].min() > 5


def test_jitter_and_blur_change_the_target(views):
    d, diff = views['debug'], _shift_diff(views)
    jitter_only = d['jitter'] & ~d['gray'] & ~d['blur']
    assert (diff[jitter_only] > 2).float().mean() > 0.9
    strong_blur_only = d['blur'] & ~d['jitter'] & ~d['gray'] & (d['sigma'] > 1.0)
    assert strong_blur_only.any() and (diff[strong_blur_only] > 0).all()
    s = d['sigma'][d['blur']]
    assert s.min() >= 0.1 and s.max() <= 2.0 and (d['sigma'][~d['blur']] == 0).all()


@pytest.mark.parametrize('pipeline', PIPELINES)
def test_normalization_constants_exact(tmp_path, pipeline):
    assert MEAN == (123.675, 116.28, 103.53) and STD == (58.395, 57.12, 57.375)
    rgb = (200, 50, 120)
    write_folder(tmp_path, {'a': [solid_image(90, 70, rgb)] * 4})
    loader = build_pretrain_loader(cfg(tmp_path, pipeline), img_size=32, batch_size=4, debug=True)
    batch = next(iter(loader))
    want = (torch.tensor(rgb, dtype=torch.float32) - torch.tensor(MEAN)) / torch.tensor(STD)
    torch.testing.assert_close(batch['img'], want.view(1, 3, 1, 1).expand(4, 3, 32, 32), atol=1e-5, rtol=0)


@pytest.mark.parametrize('pipeline', PIPELINES)
def test_other_formats_decode_to_rgb(tmp_path, pipeline):
    """CMYK JPEG, grayscale JPEG, RGBA and palette PNG all come out as the right RGB color."""
    rgb = (200, 60, 30)
    img = solid_image(80, 64, rgb)
    img.convert('CMYK').save(tmp_path / 'cmyk.jpg', quality=95)
    img.convert('L').save(tmp_path / 'gray.jpg', quality=95)
    img.convert('RGBA').save(tmp_path / 'rgba.png')
    img.convert('P').save(tmp_path / 'palette.png')
    loader = build_pretrain_loader(cfg(tmp_path, pipeline), img_size=32, batch_size=4, debug=True)
    batch = next(iter(loader))
    px = (batch['img'] * torch.tensor(STD).view(1, 3, 1, 1) + torch.tensor(MEAN).view(1, 3, 1, 1)).mean((2, 3))
    gray = 0.299 * rgb[0] + 0.587 * rgb[1] + 0.114 * rgb[2]
    names = sorted(['cmyk.jpg', 'gray.jpg', 'rgba.png', 'palette.png'])
    for i, idx in enumerate(batch['index'].tolist()):
        want = torch.full((3,), gray) if names[idx] == 'gray.jpg' else torch.tensor(rgb, dtype=torch.float32)
        assert (px[i] - want).abs().max() < 8, (names[idx], px[i], want)


def test_every_pipeline_makes_the_torch_pipelines_views_of_a_sample(tmp_path):
    """The draws are shared (draws.py): every decision and crop box of DALI and torch_gpu equals torch's, and the
    pixels differ only by the libraries' resampling (and, on the target, their color ops, so that is compared where
    none was drawn). A panorama exercises the central-crop fallback when no candidate box fits."""
    write_folder(
        tmp_path,
        {'wide': [coord_image(160, 120)] * 8, 'tall': [coord_image(120, 160)] * 8, 'pano': [coord_image(400, 60)] * 8},
    )
    runs = {}
    for pipeline in PIPELINES:
        loader = build_pretrain_loader(cfg(tmp_path, pipeline, extra=EXTRA), img_size=S, batch_size=8, debug=True)
        runs[pipeline] = []
        for epoch in range(2):
            loader.set_epoch(epoch)
            runs[pipeline] += list(loader)
    std = torch.tensor(STD).view(1, 3, 1, 1)
    fallback = 0
    pairs = [(a, b) for other in PIPELINES[1:] for a, b in zip(runs['torch'], runs[other])]
    for a, b in pairs:
        assert torch.equal(a['index'], b['index'])
        for k in a['debug']:
            assert torch.equal(a['debug'][k], b['debug'][k]), k
        assert ((a['img'] - b['img']) * std).abs().max() < 3  # 0-255 levels
        d = a['debug']
        clean = ~(d['jitter'] | d['gray'] | d['blur'])
        if clean.any():
            assert ((a['img_target'] - b['img_target'])[clean] * std).abs().max() < 3
        fallback += int(((d['box'][:, 2] == 60) & (d['box'][:, 3] == 80)).sum())
    assert fallback > 0


def test_crop_boxes_follow_torchvision_rules():
    """Area fraction in (0.2, 1) and aspect in (3/4, 4/3) up to pixel rounding, inside the image, distributed as
    torchvision's sampler's, positions spread over the free range; an image no candidate fits takes the central crop
    at the nearest allowed ratio."""
    from cmae_ds.data.views.draws import draw_views, rrc_box

    boxes = torch.tensor([rrc_box(draw_views(0, 0, i, 32), 500, 375) for i in range(2000)]).double()
    top, left, h, w = boxes.unbind(1)
    assert (top >= 0).all() and (left >= 0).all() and (top + h <= 375).all() and (left + w <= 500).all()
    area = h * w / (500 * 375)
    assert area.min() > 0.19 and area.max() <= 1
    # Rejection favours small boxes (large ones overflow more often): compare with torchvision's own sampler.
    from PIL import Image
    from torchvision.transforms import RandomResizedCrop

    torch.manual_seed(0)
    img = Image.new('RGB', (500, 375))
    tv = torch.tensor([RandomResizedCrop.get_params(img, [0.2, 1.0], [3 / 4, 4 / 3]) for _ in range(2000)]).double()
    tv_area = tv[:, 2] * tv[:, 3] / (500 * 375)
    assert abs(area.mean().item() - tv_area.mean().item()) < 0.02
    assert abs((w / h).mean().item() - (tv[:, 3] / tv[:, 2]).mean().item()) < 0.02
    aspect = w / h
    assert aspect.min() > 0.74 and aspect.max() < 1.35
    free = 500 - w
    u = (left / free.clamp_min(1))[free > 50]
    assert abs(u.mean().item() - 0.5) < 0.05
    pano = rrc_box(draw_views(0, 0, 1, 32), 400, 60)
    assert pano == (0, 160, 60, 80)


@pytest.mark.skipif(not torch.cuda.is_available(), reason='the DALI GPU graph needs a GPU (and DALI installed)')
@pytest.mark.gpu
def test_dali_gpu_graph_makes_the_cpu_graphs_views(tmp_path):
    """Same draws, so the same decisions and boxes; pixels within nvJPEG-vs-libjpeg and kernel rounding. The hardware
    decoder is on by default (hw_decoder_load 0.65), so both decoders are exercised on a batch of 32."""
    pytest.importorskip('nvidia.dali')
    write_folder(
        tmp_path, {'wide': [coord_image(160, 120)] * 16, 'tall': [coord_image(120, 160)] * 16}, ext='.jpg', quality=95
    )
    got = {}
    for device in ('cpu', 'cuda'):
        loader = build_pretrain_loader(
            cfg(tmp_path, 'dali', extra=EXTRA), img_size=S, batch_size=32, device=device, debug=True
        )
        loader.set_epoch(0)
        got[device] = next(iter(loader))
    cpu, gpu = got['cpu'], got['cuda']
    assert gpu['img'].is_cuda and gpu['img_target'].is_cuda
    for k in cpu['debug']:
        assert torch.equal(cpu['debug'][k], gpu['debug'][k].cpu()), k
    std = torch.tensor(STD).view(1, 3, 1, 1)
    assert ((cpu['img'] - gpu['img'].cpu()) * std).abs().max() < 8


@pytest.mark.parametrize('pipeline', PIPELINES)
def test_mae_mode_makes_the_official_mae_view(tmp_path, pipeline):
    """MAE's official pipeline (configs/pre-training/mae/mae_vit-base-p16_32xb128-coslr-300e_in1k.py in the official
    repository): RandomResizedCrop straight to the view's size, crop ratio (0.2, 1.0), bicubic with the pillow
    backend (mmcv's imcrop of the box, then imresize), RandomFlip 0.5. Here the crop and resize come from torchvision
    (`resized_crop` on the PIL image: PIL's crop, then its bicubic resize) for each sample's drawn box and flip; the
    model mode alone picks it (CMAE's master is 32 pixels larger, its online view a window of it)."""
    import torchvision.transforms.functional as TF
    from PIL import Image

    from cmae_ds.config import load_config

    paths = write_folder(tmp_path, {'wide': [coord_image(160, 120)] * 4, 'tall': [coord_image(120, 160)] * 4})
    mae = load_config(
        None, ['model.mode=mae', f'data.root={tmp_path}', f'data.pipeline={pipeline}', 'data.source=folder']
    )
    assert mae.data.master_extra == 0 and load_config(None, []).data.master_extra == 32
    loader = build_pretrain_loader(mae.data, img_size=S, batch_size=8, debug=True)
    batch = next(iter(loader))
    mean, std = torch.tensor(MEAN).view(3, 1, 1), torch.tensor(STD).view(3, 1, 1)
    for i, index in enumerate(batch['index'].tolist()):
        top, left, h, w = batch['debug']['box'][i].tolist()
        ref = TF.resized_crop(Image.open(paths[index]), top, left, h, w, [S, S], TF.InterpolationMode.BICUBIC)
        ref = TF.hflip(ref) if batch['debug']['flip'][i] else ref
        ref = (TF.pil_to_tensor(ref).float() - mean) / std
        levels = ((batch['img'][i] - ref) * std).abs().max().item()  # 0-255 levels
        assert levels < (1e-3 if pipeline == 'torch' else 3), (pipeline, i, levels)
