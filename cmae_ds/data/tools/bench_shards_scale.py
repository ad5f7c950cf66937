"""Shards at scale (docs/data.md, "Shards"): thousands of shards under a low file limit, and the index build per rank.

    python -m cmae_ds.data.tools.bench_shards --scale [--shards 2000 --per-shard 100 --limit 256 --ranks 4]

Generates --shards tars of --per-shard tiny JPEGs (16x16, a few hundred bytes; make_shards' member layout) and the
same images as an ImageNet-style folder, under /tmp. Then:
- index build per rank: --ranks processes start load_index on the index-less shards at once, with the lock (one
  builds, the others wait and read its index) and without it (each builds its own); seconds per rank and builds;
- an epoch in random order in a child process whose RLIMIT_NOFILE is set to --limit (soft and hard): every sample's
  bytes read once from the shards and from the folder, with samples/s, read syscalls per sample (/proc/self/io
  syscr), shard opens per sample, and open descriptors held (the most seen in /proc/self/fd);
- unless --no-views, the torch pipeline's pretraining views of the same epoch from both sources (8x8 views), checked
  equal and every sample seen once, with samples/s.
"""

from __future__ import annotations

import io
import json
import multiprocessing as mp
import os
import random
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

from ..sources import shard_index
from ..sources.packing import sample_key

EPOCH = r"""
import json, resource, sys
limit = int(sys.argv[3])
resource.setrlimit(resource.RLIMIT_NOFILE, (limit, limit))
from cmae_ds.data.tools.bench_shards_scale import epoch
print(json.dumps(epoch(sys.argv[1], sys.argv[2], sys.argv[4] == 'views')))
"""


def tiny_jpegs(n: int = 512, seed: int = 0) -> list[bytes]:
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        buf = io.BytesIO()
        Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(buf, 'JPEG', quality=80)
        out.append(buf.getvalue())
    return out


def generate(tmp: Path, shards: int, per: int, classes: int = 1000) -> tuple[Path, Path]:
    """(folder, shard folder) holding the same shards * per images in the same order (folder order = sample order:
    class c holds samples c*m .. c*m + m-1)."""
    blobs, n = tiny_jpegs(), shards * per
    folder, out = tmp / 'folder', tmp / 'shards'
    out.mkdir(parents=True)
    m = -(-n // classes)
    for s in range(shards):
        with tarfile.open(out / f'shard-{s:06d}.tar', 'w', format=tarfile.GNU_FORMAT) as tf:
            for i in range(s * per, (s + 1) * per):
                label, name = i // m, f'{i:07d}'
                path = folder / f'c{label:04d}' / f'{name}.jpg'
                path.parent.mkdir(parents=True, exist_ok=True)
                data = blobs[i % len(blobs)]
                path.write_bytes(data)
                for ext, blob in (('jpg', data), ('cls', str(label).encode())):
                    info = tarfile.TarInfo(f'{sample_key(i, str(path))}.{ext}')
                    info.size, info.mtime = len(blob), 0
                    tf.addfile(info, io.BytesIO(blob))
    return folder, out


def _rank(root: str, locking: bool, barrier, queue) -> None:
    shard_index.LOCKING = locking
    built = []
    real = shard_index._build
    shard_index._build = lambda *a: built.append(1) or real(*a)
    barrier.wait()
    t = time.perf_counter()
    index = shard_index.load_index(root)
    queue.put(dict(seconds=time.perf_counter() - t, built=len(built), samples=len(index)))


def index_build(out: Path, ranks: int, locking: bool) -> dict:
    for p in list(out.glob('shards.index.npz')) + list(out.glob('.shards.index.lock')):
        p.unlink()
    ctx = mp.get_context('fork')
    barrier, queue = ctx.Barrier(ranks), ctx.Queue()
    procs = [ctx.Process(target=_rank, args=(str(out), locking, barrier, queue)) for _ in range(ranks)]
    for p in procs:
        p.start()
    rows = [queue.get() for _ in procs]
    for p in procs:
        p.join()
    return dict(
        lock=locking,
        seconds_per_rank=sorted(round(r['seconds'], 2) for r in rows),
        builds=sum(r['built'] for r in rows),
        samples=rows[0]['samples'],
    )


def _syscr() -> int:
    for line in Path('/proc/self/io').read_text().splitlines():
        if line.startswith('syscr:'):
            return int(line.split()[1])
    return 0


def _fds() -> int:
    return len(os.listdir('/proc/self/fd'))


def _read_epoch(samples, order: list[int], read) -> dict:
    fds, r0, t = _fds(), _syscr(), time.perf_counter()
    for k, i in enumerate(order):
        read(samples, i)
        if k % 997 == 0:
            fds = max(fds, _fds())
    seconds = time.perf_counter() - t
    return dict(samples_per_s=round(len(order) / seconds), reads_per_sample=(_syscr() - r0) / len(order), fds_max=fds)


def _read_file(samples, i: int) -> bytes:
    with open(samples[i][0], 'rb') as f:
        return f.read()


def epoch(folder: str, shards: str, views: bool) -> dict:
    """Run in the child under the file limit: the read pass (and the views) over both sources."""
    import resource

    from ..sources.files import folder_samples
    from ..sources.shards import shard_samples

    files, packed = folder_samples(folder), shard_samples(shards)
    order = list(range(len(files)))
    random.Random(0).shuffle(order)
    out = dict(nofile=resource.getrlimit(resource.RLIMIT_NOFILE)[0], pool_limit=packed.files.limit, fds_at_start=_fds())
    out['folder'] = _read_epoch(files, order, _read_file)
    out['shards'] = _read_epoch(packed, order, lambda s, i: s.read(i))
    pool = packed.files
    out['shards'].update(opens_per_sample=pool.opens / len(order), pool_peak=pool.peak, preads=pool.reads)
    if views:
        out['views'] = _views(folder, shards)
    return out


def _views(folder: str, shards: str) -> dict:
    import torch

    from ...config import DataConfig
    from ..pipelines.build import build_pretrain_loader

    def loader(source, root):
        c = DataConfig(source=source, root=root, pipeline='torch', num_workers=0, master_extra=4)
        lo = build_pretrain_loader(c, img_size=8, batch_size=256, seed=7, drop_last=False)
        lo.set_epoch(1)
        return lo

    a, b = loader('folder', folder), loader('shards', shards)
    seen, same, t = [], True, time.perf_counter()
    for x, y in zip(a, b):
        seen += y['index'].tolist()
        same &= torch.equal(x['img'], y['img']) and torch.equal(x['img_target'], y['img_target'])
    seconds = time.perf_counter() - t
    once = sorted(seen) == list(range(len(b.dataset.samples)))
    return dict(both_samples_per_s=round(len(seen) / seconds), every_sample_once=once, same_views=bool(same))


def run_scale(tmp: Path, shards: int, per: int, limit: int, ranks: int, views: bool) -> dict:
    t = time.perf_counter()
    folder, out = generate(tmp, shards, per)
    result = dict(shards=shards, samples=shards * per, limit=limit, generate_s=round(time.perf_counter() - t))
    print(f'generated {shards * per} samples in {shards} shards and a folder in {result["generate_s"]}s', flush=True)
    result['index_build'] = [index_build(out, ranks, lock) for lock in (False, True)]
    for row in result['index_build']:
        print(f'index build, {ranks} ranks, lock {row["lock"]}: {row}', flush=True)
    proc = subprocess.run(
        [sys.executable, '-c', EPOCH, str(folder), str(out), str(limit), 'views' if views else '-'],
        capture_output=True,
        text=True,
    )
    if proc.returncode != 0:
        raise SystemExit(f'the epoch under RLIMIT_NOFILE {limit} failed:\n{proc.stderr[-4000:]}')
    result['epoch'] = json.loads(proc.stdout.strip().splitlines()[-1])
    print(f'epoch in random order, RLIMIT_NOFILE {limit}: {json.dumps(result["epoch"])}', flush=True)
    return result
