"""The torch_gpu pipeline's CUDA-only contracts, pinned on the CPU where a CPU can pin them: the RandAugment seeding
touches only the CPU generator, per-batch host values reach the device without a blocking copy, the batched decode
waits for its stream, a batch crosses from the workers as one buffer, and the CUDA resize's shared-memory bound.
The `gpu` tests at the end check the same on a CUDA device (launch/gpu_checks.sh runs them)."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils._python_dispatch import TorchDispatchMode

from cmae_ds.data.pipelines.torch_gpu import collate, decode_batch, unpack
from cmae_ds.data.views import batched as G
from cmae_ds.data.views.draws import draw_batch

CUDA_RNG = ('manual_seed', 'manual_seed_all', 'seed', 'seed_all', 'set_rng_state', 'set_rng_state_all')


def test_rand_augment_seeds_the_cpu_generator_only(monkeypatch):
    """torch.manual_seed would reseed every CUDA generator too (and fork_rng(devices=[]) does not restore them)."""
    touched = []
    for name in CUDA_RNG:
        monkeypatch.setattr(torch.cuda, name, lambda *a, _n=name, **k: touched.append(_n))
    x = torch.randint(0, 256, (4, 3, 24, 24), generator=torch.Generator().manual_seed(0)).float()
    before = torch.get_rng_state()
    a = G.rand_augment(x.clone(), [11, 12, 13, 14])
    assert touched == []
    assert torch.equal(torch.get_rng_state(), before)  # the caller's CPU stream is left as it was
    assert torch.equal(a, G.rand_augment(x.clone(), [11, 12, 13, 14]))  # each sample follows its own seed
    assert not torch.equal(a, G.rand_augment(x.clone(), [21, 22, 23, 24]))


class HostCopies(TorchDispatchMode):
    """Every copy from the CPU onto another device, with its non_blocking flag (None: the blocking default)."""

    def __init__(self):
        super().__init__()
        self.copies = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        src = args[0] if args and isinstance(args[0], torch.Tensor) else None
        if func is torch.ops.aten._to_copy.default and src is not None and src.device.type == 'cpu':
            if kwargs.get('device') is not None and kwargs['device'].type != 'cpu':
                self.copies.append(kwargs.get('non_blocking'))
        return func(*args, **kwargs)


def test_views_and_normalize_queue_their_host_values_without_a_blocking_copy():
    """On the meta device (no data, every op dispatched): after the per-device constants exist, each host value the
    views need is queued with non_blocking=True (on CUDA upload() pins it first). The old `.to(device)`,
    `torch.tensor(..., device=)` and `as_tensor(..., device=)` copies were blocking: a stream synchronize each."""
    meta = torch.device('meta')
    imgs = [torch.empty(3, 60, 80, dtype=torch.uint8, device=meta) for _ in range(16)]
    d = draw_batch(0, 0, np.arange(16), 8)
    assert d['jitter'].any() and d['blur'].any() and d['flip'].any()  # every kind of selection is exercised
    G.cmae_views(imgs, d, 32, 8)  # builds the per-device constants (one blocking copy each, once per process)
    with HostCopies() as rec:
        online, target = G.cmae_views(imgs, d, 32, 8)
    assert online.device == target.device == meta and online.shape == (16, 3, 32, 32)
    assert rec.copies and all(nb is True for nb in rec.copies), rec.copies


def test_batched_decode_waits_for_its_stream_first(monkeypatch):
    """torchvision's CUDA decode allocates on the current stream and writes on nvJPEG's own: the current stream is
    synchronized before the call (a recording stream and decoder stand in for CUDA here)."""
    import torchvision.io

    events = []

    class Stream:
        def synchronize(self):
            events.append('synchronize')

    def decode_jpeg(blobs, mode, device):
        events.append('decode')
        return [torch.zeros(3, 2, 2, dtype=torch.uint8) for _ in blobs]

    monkeypatch.setattr(torch.cuda, 'current_stream', lambda device=None: Stream())
    monkeypatch.setattr(torchvision.io, 'decode_jpeg', decode_jpeg)
    out = decode_batch([torch.zeros(10, dtype=torch.uint8)] * 3, torch.device('cuda'))
    assert events == ['synchronize', 'decode'] and len(out) == 3


def _jpeg_bytes(seed: int, size=(40, 30)) -> torch.Tensor:
    arr = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, 'JPEG')
    return torch.frombuffer(bytearray(buf.getvalue()), dtype=torch.uint8)


def test_collate_sends_one_buffer_and_unpack_gives_every_item_back():
    """Bytes and CPU-decoded images of any size in one uint8 tensor plus offsets and shapes: the tensors that
    cross from a worker do not grow with the batch."""
    data = [_jpeg_bytes(0), torch.randint(0, 256, (3, 7, 5), dtype=torch.uint8), _jpeg_bytes(1, (17, 9))]
    data += [torch.randint(0, 256, (3, 4, 6), dtype=torch.uint8)]
    items = [
        dict(data=d, index=10 + i, source=20 + i, label=i % 2, bad=[f'b{i}'] if i == 1 else [])
        for i, d in enumerate(data)
    ]
    batch = collate(items)
    tensors = [v for v in batch.values() if isinstance(v, torch.Tensor)]
    assert len(tensors) == len(batch) - 1 and not any(isinstance(v, torch.Tensor) for v in batch['bad'])
    assert batch['data'].dim() == 1 and batch['data'].numel() == sum(d.numel() for d in data)
    for got, want in zip(unpack(batch), data):
        assert got.shape == want.shape and torch.equal(got, want)
    assert batch['index'].tolist() == [10, 11, 12, 13] and batch['source'].tolist() == [20, 21, 22, 23]
    assert batch['label'].tolist() == [0, 1, 0, 1] and batch['bad'] == ['b1']
    assert len(collate(items * 8)) == len(batch)  # a larger batch, the same few tensors
    decoded = decode_batch(unpack(batch), torch.device('cpu'))  # the views of the buffer decode as the files do
    assert [tuple(t.shape) for t in decoded] == [(3, 30, 40), (3, 7, 5), (3, 9, 17), (3, 4, 6)]


def test_cuda_resize_bound():
    """The shared memory torch's antialiased bicubic CUDA kernel needs (48 KiB per block): up to 47x it runs, past
    that the crop is resized on the CPU; other devices never need it."""
    smem = 48 * 1024
    assert G.cuda_resize_fits((47 * 256, 47 * 256), (256, 256), smem)
    assert not G.cuda_resize_fits((48 * 256, 48 * 256), (256, 256), smem)
    # one axis alone: 32 x 5 + 33 x taps_h floats, about 91x
    assert G.cuda_resize_fits((90 * 256, 256), (256, 256), smem)
    assert not G.cuda_resize_fits((100 * 256, 256), (256, 256), smem)
    assert G.cuda_resize_fits((64, 64), (256, 256), smem)  # upscales use 5 taps
    cuda = torch.device('cuda')
    assert G.needs_host_resize((12300, 12300), (256, 256), cuda, smem)
    assert not G.needs_host_resize((1000, 800), (256, 256), cuda, smem)
    assert not G.needs_host_resize((12300, 12300), (256, 256), torch.device('cpu'))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason='needs a CUDA device')
@pytest.mark.parametrize('kind', ['cmae', 'probe', 'eval'])
def test_cuda_views_never_wait_on_the_device(kind):
    """torch's sync debug mode turns every synchronizing call (a blocking copy, .item(), nonzero) into an error."""
    cuda = torch.device('cuda')
    gen = torch.Generator().manual_seed(0)
    imgs = [torch.randint(0, 256, (3, 60 + i, 80), dtype=torch.uint8, generator=gen).to(cuda) for i in range(16)]
    d = draw_batch(0, 0, np.arange(16), 8)
    run = {
        'cmae': lambda: G.cmae_views(imgs, d, 32, 8),
        'probe': lambda: G.normalize(G.probe_views(imgs, d, 32)),
        'eval': lambda: G.normalize(G.eval_views(imgs, 32)),
    }[kind]
    run()  # the per-device constants: built once, with a blocking copy
    torch.cuda.set_sync_debug_mode('error')
    try:
        run()
    finally:
        torch.cuda.set_sync_debug_mode('default')


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason='needs a CUDA device')
def test_cuda_resize_bound_is_the_kernels_and_the_fallback_matches_the_cpu():
    cuda = torch.device('cuda')
    props = torch.cuda.get_device_properties(cuda)
    fits = [n for n in range(40, 60) if G.cuda_resize_fits((n * 8, n * 8), (8, 8), props.shared_memory_per_block)]
    n = max(fits)
    torch.nn.functional.interpolate(
        torch.rand(1, 3, n * 8, n * 8, device=cuda), size=(8, 8), mode='bicubic', antialias=True
    )
    with pytest.raises(RuntimeError, match='shared memory'):
        torch.nn.functional.interpolate(
            torch.rand(1, 3, (n + 1) * 8, (n + 1) * 8, device=cuda), size=(8, 8), mode='bicubic', antialias=True
        )
    crop = torch.randint(0, 256, (3, (n + 1) * 8, (n + 1) * 8), dtype=torch.uint8)
    with pytest.warns(UserWarning, match='resized on the CPU'):
        [got] = G.resize_all([crop.to(cuda)], [(8, 8)])
    [want] = G.resize_all([crop], [(8, 8)])
    assert torch.equal(got.cpu(), want)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason='needs a CUDA device')
def test_cuda_blur_is_fp32_like_the_cpus():
    """TF32 would put about a third of the rounded levels one off; plain fp32 differs only at rounding ties."""
    x = torch.rand((64, 3, 64, 64), generator=torch.Generator().manual_seed(1)) * 255
    sigma = np.linspace(0.1, 2.0, 64)
    blur = np.ones(64, dtype=bool)
    want = G.gaussian_blur(x.clone(), blur, sigma)
    got = G.gaussian_blur(x.cuda(), blur, sigma).cpu()
    assert (got - want).abs().max() <= 1 and (got != want).float().mean() < 1e-3


@pytest.mark.parametrize('n_in,n_out', [(37, 8), (8, 37), (200, 96), (96, 96), (97, 96), (5, 1)])
def test_resize_weights_are_torchs_antialiased_bicubic(n_in, n_out):
    """The matrices of crop_resize against torch's own kernel (F.interpolate, bicubic, antialias), one axis at a
    time: a row of the weights applied to a signal is the interpolated value."""
    x = torch.rand((1, 1, 3, n_in), generator=torch.Generator().manual_seed(n_in)) * 255
    want = torch.nn.functional.interpolate(x, size=(3, n_out), mode='bicubic', antialias=True, align_corners=False)
    got = x @ torch.from_numpy(G.aa_weights(n_in, n_out)).T
    assert (got - want).abs().max() < 1e-3


def _photos(n: int) -> list:
    from cmae_ds.data.pipelines.torch_gpu import decode_batch, sample_from_bytes
    from cmae_ds.data.sources.files import embedded_samples

    blobs = [sample_from_bytes(open(p, 'rb').read()) for p, _ in embedded_samples()[:n]]
    return decode_batch(blobs, torch.device('cpu'))


def test_batched_crop_resize_and_flip_are_the_per_crop_interpolate(monkeypatch):
    """One crop at a time through torch's interpolate (then flipped) is the reference; the batched matmuls agree to
    the level, but for float ties at a rounding boundary; a batch split to bound memory gives the same views."""
    imgs = _photos(24)
    imgs[3] = imgs[3].contiguous()  # the workers' planar layout beside the CPU decoder's interleaved one
    d = draw_batch(5, 0, np.arange(len(imgs)), 32)
    boxes = G.boxes_of(d, imgs)
    got = G.crop_resize(imgs, boxes, 96, d['flip'])
    for n, (img, (t, l, h, w)) in enumerate(zip(imgs, boxes)):
        crop = img[None, :, t : t + h, l : l + w].float()
        want = torch.nn.functional.interpolate(crop, size=(96, 96), mode='bicubic', antialias=True)[0]
        want = want.clamp(0, 255).round()
        want = want.flip(-1) if d['flip'][n] else want
        diff = (got[n] - want).abs()
        assert diff.max() <= 1 and (diff > 0).float().mean() < 1e-3, n
    monkeypatch.setattr(G, 'CHUNK', 3 * 200 * 200)  # a few crops per part
    assert len(G._chunks(boxes)) > 3
    assert torch.equal(G.crop_resize(imgs, boxes, 96, d['flip']), got)


def test_a_batch_of_views_costs_a_number_of_operators_that_does_not_grow_with_the_batch():
    """About one kernel per aten operator on CUDA: the pretraining views of 8 and of 32 images run the same number,
    but for the steps no sample of the smaller batch draws (one interpolate, stack and copy per crop made the
    count grow by about 9 per image)."""

    class Count(TorchDispatchMode):
        n = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            Count.n += 1
            return func(*args, **(kwargs or {}))

    imgs, counts = _photos(32), []
    for n in (8, 32):
        d = draw_batch(1, 0, np.arange(n), 32)
        Count.n = 0
        with Count():
            G.cmae_views(imgs[:n], d, 64, 32)
        counts.append(Count.n)
    assert counts[1] - counts[0] < 40 and counts[1] < 500, counts
