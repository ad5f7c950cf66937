"""Dataset tools: find unreadable images in parallel, write clean file lists and official annotation files."""

from __future__ import annotations

import io
import os
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np

from .files import Sample, folder_samples, write_filelist, write_official_json


def check_file(path: str) -> Optional[str]:
    """None if `path` decodes completely as an image, else the reason (zero bytes, not an image, truncated...)."""
    try:
        data = Path(path).read_bytes()
    except OSError as e:
        return f'{type(e).__name__}: {e}'
    return check_bytes(data)


def check_bytes(data: bytes) -> Optional[str]:
    """check_file for the bytes of a file or of a shard record."""
    if not data:
        return 'zero bytes'
    try:
        from PIL import Image

        with Image.open(io.BytesIO(data)) as im:
            im.load()  # a full decode: verify() alone misses truncated JPEG scans
            if im.width <= 0 or im.height <= 0:
                return 'empty image'
    except Exception as e:  # noqa: BLE001 - whatever PIL raises, the file is unusable
        return f'{type(e).__name__}: {e}'
    return None


@dataclass
class ScanResult:
    good: list[Sample] = field(default_factory=list)
    bad: list[tuple[str, str]] = field(default_factory=list)  # (path, reason)
    report: str = ''
    notes: list[str] = field(default_factory=list)  # shards: samples without an image, repeated keys


def scan_samples(samples: list[Sample], workers: int = 1, chunksize: int = 64) -> ScanResult:
    """Decode every file (in `workers` processes); split into readable samples and (path, reason) pairs."""
    paths = [p for p, _ in samples]
    if workers > 1:
        with ProcessPoolExecutor(workers) as pool:
            reasons = list(pool.map(check_file, paths, chunksize=chunksize))
    else:
        reasons = [check_file(p) for p in paths]
    result = ScanResult()
    for sample, reason in zip(samples, reasons):
        if reason is None:
            result.good.append(sample)
        else:
            result.bad.append((sample[0], reason))
    return result


def scan_folder(root: str, out: str, workers: int = 1, report: Optional[str] = None) -> ScanResult:
    """Scan the images an ImageNet-style folder lists (image extensions, as the loaders read them); write the clean
    file list (paths relative to root, label after a space) to `out` and the bad files, one 'path<TAB>reason' a
    line, to `report` (default: out + '.bad.txt')."""
    result = scan_samples(folder_samples(root), workers)
    write_filelist(result.good, out, root)
    report = report or f'{out}.bad.txt'
    Path(report).write_text(''.join(f'{p}\t{r}\n' for p, r in result.bad))
    return result


def make_annotations(root: str, out: str, prefix: str = '') -> int:
    """The official CMAE annotation JSON for an ImageNet-style folder; returns the number of images."""
    return write_official_json(root, out, prefix)


def _check_shard_records(path: str, records: list[tuple[str, int, int]]) -> list[Optional[str]]:
    """One reason (or None) per record; a read the file system refuses stops, naming the shard: it is no verdict
    on the image."""
    from .shard_index import ShardError

    try:
        with open(path, 'rb') as f:
            return [check_bytes(os.pread(f.fileno(), size, offset)) for _, offset, size in records]
    except OSError as e:
        raise ShardError(f'{path}: cannot be read ({e.strerror or e})') from None


def scan_shards(root: str, workers: int = 1, report: Optional[str] = None) -> ScanResult:
    """Walk every shard in full (a truncated or corrupt one stops with a ShardError naming it and the first bad
    key), decode every record and write the index with the undecodable records marked excluded (Index.excluded:
    every pipeline then leaves them out), beside the shards or in the cache when ROOT is read-only. The bad records,
    'shard.tar:member<TAB>reason' a line, go to `report` (default ROOT/shards.bad.txt, or the cache folder).
    ScanResult.good lists (record, label)."""
    from .shard_index import cache_dir, index_shards, load_index_file, shard_names, store_index
    from .tar_walk import report_notes, shown

    rootp = Path(root)
    names = shard_names(rootp)
    fresh = index_shards(rootp, names, workers)
    old = load_index_file(rootp)
    if old is not None:
        fresh.meta = dict(old.meta, notes=fresh.meta['notes'])  # make_shards' fingerprint: a rerun still matches
    result = ScanResult()
    per_shard = [[] for _ in names]
    for i in range(len(fresh)):
        per_shard[fresh.shard[i]].append((shown(fresh.name[i]), int(fresh.offset[i]), int(fresh.size[i])))
    paths = [str(rootp / n) for n in names]
    with ProcessPoolExecutor(max(1, workers)) as pool:
        reasons = [r for rs in pool.map(_check_shard_records, paths, per_shard) for r in rs]
    fresh.excluded = np.array([r is not None for r in reasons], dtype=bool)
    for i, reason in enumerate(reasons):
        name = f'{paths[fresh.shard[i]]}:{shown(fresh.name[i])}'
        if reason is None:
            result.good.append((name, int(fresh.label[i])))
        else:
            result.bad.append((name, reason))
    if old is None or not same_index(old, fresh):
        where = store_index(fresh, rootp)
        print(f'{"no" if old is None else "a stale"} index for {root} (or new exclusions): written to {where}')
    result.notes = report_notes(rootp, fresh.meta['notes'])
    report = report or str(rootp / 'shards.bad.txt' if os.access(rootp, os.W_OK) else cache_dir() / 'shards.bad.txt')
    Path(report).write_text(''.join(f'{p}\t{r}\n' for p, r in result.bad))
    result.report = report
    return result


def same_index(a, b) -> bool:
    keys = ('name', 'size', 'mtime_ns', 'crc32', 'samples')
    if [[s[k] for k in keys] for s in a.shards] != [[s[k] for k in keys] for s in b.shards]:
        return False
    if not all(np.array_equal(getattr(a, k), getattr(b, k)) for k in ('shard', 'offset', 'size', 'label', 'name')):
        return False
    return np.array_equal(_mask(a), _mask(b))


def _mask(index) -> np.ndarray:
    return index.excluded if index.excluded is not None else np.zeros(len(index), bool)
