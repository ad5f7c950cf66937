"""Read rate of shards against the same images as a folder of files (docs/data.md, "Shards").

    python -m cmae_ds.data.tools.bench_shards --files 20000 --workers 2 [--root DIR] [--json OUT]
    python -m cmae_ds.data.tools.bench_shards --scale [--shards 2000 --per-shard 100 --limit 256 --ranks 4]

--scale: thousands of shards under a low file limit and the index build per rank (bench_shards_scale.py).

Without --root it writes `--files` small JPEGs (64x48, random content) into an ImageNet-style folder under /tmp,
packs them with make_shards' code (pack) beside it, and reads every image's bytes once in a random order (the order
training reads in): in this process, then in `--workers` DataLoader workers (one rank's), each with the page cache
warm (a pass before) and dropped for the files read (posix_fadvise DONTNEED on every file or shard before the
pass). Only reading is timed: no decoding. Peak RSS says whether memory stays bounded.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from ..sources.files import folder_samples
from ..sources.packing import pack
from ..sources.shards import ShardSamples, record_bytes, shard_samples


def write_small_jpegs(root: Path, n: int, classes: int = 100, seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    for c in range(classes):
        (root / f'c{c:03d}').mkdir(parents=True, exist_ok=True)
    for i in range(n):
        arr = rng.integers(0, 256, (48, 64, 3), dtype=np.uint8)
        Image.fromarray(arr).save(root / f'c{i % classes:03d}' / f'{i:07d}.jpg', quality=90)


def drop_cache(paths: list[str]) -> None:
    """DONTNEED leaves dirty pages in the cache: the freshly written files are synced first."""
    os.sync()
    for p in paths:
        fd = os.open(p, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


class _Bytes(Dataset):
    def __init__(self, samples):
        self.samples = samples

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> int:
        return len(record_bytes(self.samples, i))


def _sum(sizes: list[int]) -> int:
    return sum(sizes)


def read_pass(samples, order: np.ndarray, workers: int, batch: int = 64) -> tuple[float, int]:
    """(seconds, bytes) to read every sample's bytes in `order`, in this process (workers=0) or in workers."""
    t = time.perf_counter()
    if workers == 0:
        nbytes = sum(len(record_bytes(samples, int(i))) for i in order)
    else:
        batches = [order[k : k + batch].tolist() for k in range(0, len(order), batch)]
        dl = DataLoader(_Bytes(samples), batch_sampler=batches, num_workers=workers, collate_fn=_sum)
        nbytes = sum(dl)
    return time.perf_counter() - t, nbytes


def measure(samples, files_to_drop: list[str], order: np.ndarray, workers: int, cold: bool) -> dict:
    if cold:
        drop_cache(files_to_drop)
    else:
        read_pass(samples, order, 0)
    seconds, nbytes = read_pass(samples, order, workers)
    return dict(seconds=seconds, files_per_s=len(order) / seconds, mb_per_s=nbytes / seconds / 1e6)


def _rss_mb() -> tuple[float, float]:
    """(this process's resident MB now, the largest peak of a reaped worker in MB)."""
    pages = int(Path('/proc/self/statm').read_text().split()[1])
    kids = resource.getrusage(resource.RUSAGE_CHILDREN)
    return pages * os.sysconf('SC_PAGE_SIZE') / 1e6, kids.ru_maxrss / 1024


def run(root: Path, shards: Path, workers: int, seed: int = 0) -> list[dict]:
    folder = folder_samples(root)
    packed: ShardSamples = shard_samples(shards)
    order = np.random.default_rng(seed).permutation(len(folder))
    rows = []
    for w in (0, workers):
        for cold in (False, True):
            row = dict(workers=w, cache='dropped' if cold else 'warm')
            row['folder'] = measure(folder, [p for p, _ in folder], order, w, cold)
            row['shards'] = measure(packed, packed.paths, order, w, cold)
            row['ratio'] = row['shards']['files_per_s'] / row['folder']['files_per_s']
            row['rss_mb'], row['worker_rss_mb'] = _rss_mb()
            rows.append(row)
            print(
                f'{"process" if w == 0 else f"{w} workers":<10} {row["cache"]:<8} '
                f'folder {row["folder"]["files_per_s"]:>9.0f} files/s  shards {row["shards"]["files_per_s"]:>9.0f} '
                f'files/s  ratio {row["ratio"]:.2f}x  RSS {row["rss_mb"]:.0f} MB '
                f'(worker peak {row["worker_rss_mb"]:.0f})',
                flush=True,
            )
    return rows


def dali_read_rates(shards: ShardSamples, order: np.ndarray, threads: int, batch: int = 64) -> dict:
    """Images/s of DALI reading the encoded bytes (no decode), warm cache: our external source (RecordFeed, random
    order by index) against DALI's own webdataset reader (its shard order; index built by DALI)."""
    from nvidia.dali import fn, pipeline_def

    from ..pipelines.dali import RecordFeed

    def rate(graph, iters: int) -> float:
        pipe = pipeline_def(graph, batch_size=batch, num_threads=threads, device_id=None, seed=0)()
        pipe.build()
        pipe.run()
        t = time.perf_counter()
        for _ in range(iters):
            pipe.run()
        return iters * batch / (time.perf_counter() - t)

    iters = len(order) // batch - 4
    feed = RecordFeed(shards, order.tolist(), batch, threads)
    ours = rate(lambda: tuple(fn.external_source(source=feed, num_outputs=2, batch=True, batch_info=True)), iters)
    feed.close()
    wds = rate(lambda: fn.readers.webdataset(paths=shards.paths, ext=['jpg'], random_shuffle=False), iters)
    return dict(external_source=ours, webdataset_reader=wds)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument('--files', type=int, default=20000)
    ap.add_argument('--workers', type=int, default=2, help="DataLoader workers: one rank's")
    ap.add_argument('--shard-mb', type=float, default=64, help='shard size for the packing (MB)')
    ap.add_argument('--root', type=Path, default=None, help='an existing ImageNet-style folder instead')
    ap.add_argument('--dali', action='store_true', help="also DALI's two ways of reading shards")
    ap.add_argument('--json', type=Path, default=None)
    ap.add_argument('--scale', action='store_true', help='the at-scale run instead (bench_shards_scale.py)')
    ap.add_argument('--shards', type=int, default=2000)
    ap.add_argument('--per-shard', type=int, default=100)
    ap.add_argument('--limit', type=int, default=256, help='RLIMIT_NOFILE of the epoch (--scale)')
    ap.add_argument('--ranks', type=int, default=4, help='processes building the index at once (--scale)')
    ap.add_argument('--no-views', action='store_true', help='--scale: reads only, not the torch views')
    args = ap.parse_args(argv)
    if args.scale:
        from .bench_shards_scale import run_scale

        with tempfile.TemporaryDirectory(prefix='bench_shards_scale_', dir='/tmp') as tmp:
            result = run_scale(Path(tmp), args.shards, args.per_shard, args.limit, args.ranks, not args.no_views)
        if args.json:
            args.json.write_text(json.dumps(result, indent=1))
        return
    with tempfile.TemporaryDirectory(prefix='bench_shards_', dir='/tmp') as tmp:
        root = args.root or Path(tmp) / 'folder'
        if args.root is None:
            t = time.perf_counter()
            write_small_jpegs(root, args.files)
            print(f'wrote {args.files} JPEGs in {time.perf_counter() - t:.0f}s', flush=True)
        t = time.perf_counter()
        index, _ = pack(folder_samples(root), Path(tmp) / 'shards', int(args.shard_mb * 1e6), args.workers, False)
        mb = sum(s['size'] for s in index.shards) / 1e6
        print(
            f'{len(index)} files ({mb / len(index) * 1000:.1f} KB each) packed into {len(index.shards)} shards in '
            f'{time.perf_counter() - t:.0f}s',
            flush=True,
        )
        rows = run(root, Path(tmp) / 'shards', args.workers)
        if args.dali:
            order = np.random.default_rng(0).permutation(len(index))
            dali = dali_read_rates(shard_samples(Path(tmp) / 'shards'), order, args.workers)
            print(
                f'DALI, reading bytes, {args.workers} threads, warm: external source {dali["external_source"]:.0f} '
                f'images/s, webdataset reader {dali["webdataset_reader"]:.0f} images/s',
                flush=True,
            )
            rows.append(dict(dali=dali))
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))


if __name__ == '__main__':
    main()
