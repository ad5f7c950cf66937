"""Data-only benchmark: images/s of the DALI, torch and torch_gpu pipelines on the same JPEGs and threads.

    python -m cmae_ds.data.tools.bench --images 512 --batch 64 --threads 2 [--device cuda] [--root DIR]
        [--pipelines dali,torch,torch_gpu]

Without --root it writes ImageNet-like JPEGs (500x375, quality 90, photo content from the embedded set) to a temp
folder. Each pipeline runs `--epochs` epochs of the CMAE pretraining views (224 + 32 master); the first batch of
each run (pipeline build, worker start) is excluded from the rate.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from cmae_ds.config import DataConfig

from ..pipelines.build import build_pretrain_loader
from ..sources.files import embedded_samples


def write_imagenet_like(root: Path, n: int, size=(500, 375), seed: int = 0) -> None:
    """n JPEGs of photo content at ImageNet's typical size, spread over 10 class folders."""
    rng = np.random.default_rng(seed)
    photos = [Image.open(p).convert('RGB') for p, _ in embedded_samples()]
    for i in range(n):
        img = photos[i % len(photos)].resize(size, Image.BICUBIC)
        arr = np.asarray(img, dtype=np.int16) + rng.integers(
            -16, 17, (size[1], size[0], 3)
        )  # grain: ~110 KB files like ImageNet
        d = root / f'class_{i % 10:02d}'
        d.mkdir(parents=True, exist_ok=True)
        Image.fromarray(arr.clip(0, 255).astype(np.uint8)).save(d / f'{i:06d}.jpg', quality=90)


def time_pipeline(root: Path, pipeline: str, batch: int, threads: int, img_size: int, device: str, epochs: int) -> dict:
    data_cfg = DataConfig(source='folder', root=str(root), pipeline=pipeline, num_workers=threads)
    loader = build_pretrain_loader(data_cfg, img_size=img_size, batch_size=batch, device=device)
    images, seconds, firsts = 0, 0.0, 0
    cpu0 = _cpu_seconds()
    for epoch in range(epochs):
        loader.set_epoch(epoch)
        it = iter(loader)
        first = b = next(it)
        _sync(first)
        t = last = time.perf_counter()
        for b in it:
            images += len(b['img'])
            _sync(b)
            last = time.perf_counter()
        # Up to the last batch: the end-of-epoch teardown (DALI joins the batches it prefetched past the end,
        # DataLoader joins its workers) is a one-off per epoch, not a rate; it still counts in the CPU time.
        seconds += last - t
        firsts += len(first['img'])
        del it  # joins the DataLoader workers, so their CPU time is counted below
    cpu = _cpu_seconds() - cpu0
    return dict(
        name=loader.name,
        images=images,
        seconds=seconds,
        rate=images / max(seconds, 1e-9),
        cpu_ms=1e3 * cpu / max(images + firsts, 1),
    )


def dali_stage_costs(root: Path, batch: int, threads: int, img_size: int, iters: int = 24) -> list[tuple]:
    """CPU ms per image of growing prefixes of the DALI CPU pretraining graph (the real operators and arguments of
    dali_graphs.cmae_views), so the cost of each stage is the difference between two rows."""
    from nvidia.dali import fn, types

    from ..views import dali_graphs as G

    files = sorted(str(p) for p in root.rglob('*.jpg'))
    indices = list(range(len(files)))
    m = img_size + 32

    def prefix(stage: int):
        jpegs, _ = G.read_files(files, indices)
        x = fn.decoders.image_random_crop(
            jpegs,
            random_area=[0.2, 1.0],
            random_aspect_ratio=[3 / 4, 4 / 3],
            num_attempts=10,
            device='cpu',
            output_type=types.RGB,
            **G.DECODE,
        )
        if stage >= 1:
            x = fn.resize(x, size=[m, m], interp_type=types.INTERP_CUBIC, antialias=True)
        if stage < 2:
            return x
        online = G._normalize(x, crop=[img_size, img_size], crop_pos_x=0.0, crop_pos_y=0.0)
        if stage == 2:
            return online
        x = fn.crop(x, crop=[img_size, img_size], crop_pos_x=0.5, crop_pos_y=0.5)
        if stage >= 4:
            x = fn.color_twist(x, brightness=1.2, contrast=0.8, saturation=0.7, hue=10.0)
        if stage >= 5:
            x = fn.gaussian_blur(x, sigma=fn.random.uniform(range=list(G.C.BLUR_SIGMA)))
        return online, G._normalize(x)

    names = [
        'ROI decode + crop',
        '+ cubic resize to master',
        '+ online view (crop, normalize)',
        '+ target window + normalize (no color ops)',
        '+ color_twist (every sample)',
        '+ gaussian_blur (every sample, sigma U[0.1, 2])',
    ]
    rows = []
    for stage, name in enumerate(names):
        rows.append((name,) + _steady_cost(lambda stage=stage: prefix(stage), batch, threads, iters))
    from ..pipelines.dali import DrawFeed

    feed = DrawFeed(indices, batch, seed=0, epoch=0, extra=32)
    full = _steady_cost(
        lambda: G.cmae_views(files, indices, feed, img_size, 32, 'cpu', 0.65, False), batch, threads, iters
    )
    rows.append(('full graph (cmae_views, shared draws)',) + full)
    return rows


def _steady_cost(graph, batch: int, threads: int, iters: int) -> tuple[float, float]:
    """(CPU ms per image, images/s) of a CPU DALI graph after its first batch."""
    from nvidia.dali import pipeline_def

    pipe = pipeline_def(enable_conditionals=True)(graph)(batch_size=batch, num_threads=threads, device_id=None, seed=1)
    pipe.build()
    pipe.run()
    cpu0, t = _cpu_seconds(), time.perf_counter()
    for _ in range(iters):
        pipe.run()
    return 1e3 * (_cpu_seconds() - cpu0) / (iters * batch), iters * batch / (time.perf_counter() - t)


def _cpu_seconds() -> float:
    """User + system CPU time of this process (DALI's threads) and its reaped children (DataLoader workers)."""
    import resource

    me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime


def _sync(batch: dict) -> None:
    if batch['img'].is_cuda:
        torch.cuda.synchronize(batch['img'].device)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument('--images', type=int, default=512)
    ap.add_argument('--batch', type=int, default=64)
    ap.add_argument('--threads', type=int, default=2, help='DALI CPU threads = torch DataLoader workers')
    ap.add_argument('--img-size', type=int, default=224)
    ap.add_argument('--epochs', type=int, default=2)
    ap.add_argument(
        '--device',
        default='cpu',
        help="'cuda': DALI's GPU graph and torch_gpu on the GPU (torch's workers stay on the CPU)",
    )
    ap.add_argument('--root', type=Path, default=None, help='an existing ImageNet-style folder instead')
    ap.add_argument('--pipelines', default='dali,torch,torch_gpu')
    ap.add_argument('--stages', action='store_true', help='CPU cost of each stage of the DALI CPU graph instead')
    ap.add_argument('--json', type=Path, default=None, help='also write the results here')
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        root = args.root
        if root is None:
            root = Path(tmp)
            write_imagenet_like(root, args.images)
        mb = sum(p.stat().st_size for p in root.rglob('*.jpg')) / 1e6
        n = len(list(root.rglob('*.jpg')))
        print(
            f'{n} JPEGs ({mb / n * 1000:.0f} KB each) in {root}; batch {args.batch}, {args.threads} threads/'
            f'workers, views {args.img_size}+32, device {args.device}, torch threads {torch.get_num_threads()}'
        )
        if args.stages:
            print(f'{"DALI CPU graph, cumulative":<48} {"CPU ms/image":>12} {"images/s":>9}')
            for name, ms, rate in dali_stage_costs(root, args.batch, args.threads, args.img_size):
                print(f'{name:<48} {ms:>12.2f} {rate:>9.1f}')
            return
        results = [
            time_pipeline(root, p, args.batch, args.threads, args.img_size, args.device, args.epochs)
            for p in args.pipelines.split(',')
        ]
    print(f'{"pipeline":<10} {"images":>7} {"seconds":>8} {"images/s":>9} {"CPU ms/image":>13}')
    for r in results:
        print(f'{r["name"]:<10} {r["images"]:>7} {r["seconds"]:>8.2f} {r["rate"]:>9.1f} {r["cpu_ms"]:>13.1f}')
    print_ratios(results)
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))


def print_ratios(results: list[dict]) -> None:
    """Each pipeline against torch (the first one when torch did not run)."""
    base = next((r for r in results if r['name'] == 'torch'), results[0])
    for r in results:
        if r is not base:
            print(
                f'ratio {r["name"]} / {base["name"]}: {r["rate"] / base["rate"]:.2f}x images/s, '
                f'{base["cpu_ms"] / r["cpu_ms"]:.2f}x less CPU per image'
            )


if __name__ == '__main__':
    main()
