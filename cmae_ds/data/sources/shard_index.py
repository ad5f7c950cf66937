"""The index of a folder of webdataset shards: where each sample's image lies (shard, byte offset, size) and its
label, so that samples are read by index and sampling, draws and resume stay those of a folder of files.

The index file (INDEX_NAME) sits beside the shards, or in the user cache (cache_dir) when that folder is read-only.
Per shard it records size, mtime and CRC-32. Every start compares size and mtime of each shard (one stat a shard);
only a shard whose stat differs is read in full: if its CRC-32 still matches (a copy that did not keep mtimes), the
record is refreshed, otherwise the shard is walked again. A shard the index lists but the folder lacks is refused.
The full checksum runs on a rebuild and in launch/scan_dataset.py, not on every start: it reads the whole dataset.

The samples of a shard are found by tar_walk.py (webdataset's grouping, strict about damage); one process builds
the index while the others wait for it (index_lock.py).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import numpy as np

from ..errors import DataSourceError, ShardError
from .index_lock import LOCK_NAME, take_lock, touch, wait_for_lock
from .tar_walk import describe_shard, merge_notes, raw_name, report_notes, walk_shard

log = logging.getLogger(__name__)

INDEX_NAME = 'shards.index.npz'
VERSION = 1
LOCKING = True  # the benchmark turns it off to time every rank building its own index


@dataclass
class Index:
    """Per sample: shard (int32), offset and size (int64) of the image bytes, label (int64; -1 without .cls), name
    (bytes: the image member's name), excluded (bool, or None: records the scan found undecodable, which every
    pipeline leaves out). Per shard: {'name', 'size', 'mtime_ns', 'crc32', 'samples'}."""

    shards: list[dict]
    shard: np.ndarray
    offset: np.ndarray
    size: np.ndarray
    label: np.ndarray
    name: np.ndarray
    meta: dict
    excluded: Optional[np.ndarray] = None

    def __len__(self) -> int:
        return len(self.shard)


def shard_names(root: Path) -> list[str]:
    return sorted(p.name for p in Path(root).iterdir() if p.name.endswith('.tar') and p.is_file())


def build_index(root: Path, shards: list[dict], records: list[list]) -> Index:
    """Index from per-shard descriptions and per-shard walk_shard records (same order)."""
    n = sum(len(r) for r in records)
    shard = np.empty(n, np.int32)
    offset, size, label = np.empty(n, np.int64), np.empty(n, np.int64), np.empty(n, np.int64)
    names, i = [], 0
    for s, (desc, recs) in enumerate(zip(shards, records)):
        desc['samples'] = len(recs)
        k = len(recs)
        shard[i : i + k] = s
        if k:
            nm, off, sz, lab = zip(*recs)
            offset[i : i + k], size[i : i + k], label[i : i + k] = off, sz, lab
            names += nm
        i += k
    name = np.array([x if isinstance(x, bytes) else raw_name(x) for x in names], dtype=bytes)
    return Index(shards, shard, offset, size, label, name if names else np.array([], dtype='S1'), dict(version=VERSION))


def save_index(index: Index, path: Path) -> None:
    """Written to a mkstemp file in the target folder (a name no other process or node can hold) and renamed."""
    meta = dict(index.meta, shards=index.shards)
    arrays = dict(shard=index.shard, offset=index.offset, size=index.size, label=index.label, name=index.name)
    if index.excluded is not None and index.excluded.any():
        arrays['excluded'] = index.excluded
    fd, tmp = tempfile.mkstemp(prefix=f'{path.name}.', suffix='.tmp', dir=path.parent)
    try:
        os.fchmod(fd, 0o644)  # mkstemp's 0600 would hide a shared dataset's index from the other users
        with os.fdopen(fd, 'wb') as f:
            np.savez(f, meta=np.array(json.dumps(meta)), **arrays)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        Path(tmp).unlink(missing_ok=True)


def read_index(path: Path) -> Index:
    try:
        with np.load(path, allow_pickle=False) as z:
            meta = json.loads(str(z['meta']))
            arrays = [z[k] for k in ('shard', 'offset', 'size', 'label', 'name')]
            excluded = z['excluded'] if 'excluded' in z.files else None
    except Exception as e:  # noqa: BLE001 - whatever numpy or json raise, the file is not our index
        raise ShardError(f'{path}: unreadable shard index ({type(e).__name__}: {e}); delete it to rebuild') from None
    if meta.get('version') != VERSION:
        raise ShardError(f'{path}: shard index version {meta.get("version")}, this code reads {VERSION}')
    return Index(meta.pop('shards'), *arrays, meta, excluded)


def cache_dir() -> Path:
    """Where the index of a read-only shard folder goes: CMAE_DS_INDEX_CACHE (set it to node-local disk, e.g.
    $SLURM_TMPDIR, where the home folder is shared), else the user cache."""
    if os.environ.get('CMAE_DS_INDEX_CACHE'):
        return Path(os.environ['CMAE_DS_INDEX_CACHE'])
    base = os.environ.get('XDG_CACHE_HOME') or os.path.join(os.path.expanduser('~'), '.cache')
    return Path(base) / 'cmae_ds' / 'shard_index'


def cached_index_path(root: Path) -> Path:
    digest = hashlib.sha1(str(Path(root).resolve()).encode()).hexdigest()[:16]
    return cache_dir() / f'{Path(root).resolve().name}-{digest}.npz'


def load_index(root: str | os.PathLike) -> Index:
    """The index of the shard folder `root`, checked against the shards; rebuilt (and cached) where stale, by one
    process at a time (the lock file), the others waiting for its result."""
    root = Path(root)
    if not root.is_dir():
        raise DataSourceError(f'data.root {root} is not a directory')
    names = shard_names(root)
    if not names:
        raise DataSourceError(f'data.source shards: no .tar files in {root}')
    lock = lock_path(root)
    while True:
        index = _valid_index(root, names)
        if index is not None:
            return index
        if not LOCKING:
            return _build(root, names, lambda: None)
        if take_lock(lock):
            try:
                return _valid_index(root, names) or _build(root, names, lambda: touch(lock))
            finally:
                lock.unlink(missing_ok=True)
        wait_for_lock(lock, root)


def _valid_index(root: Path, names: list[str]) -> Optional[Index]:
    for path in index_files(root):
        index = read_index(path)
        if not stale_shards(root, index, names, path):
            return index
    return None


def _build(root: Path, names: list[str], tick: Callable[[], None]) -> Index:
    found = [(p, read_index(p)) for p in index_files(root)]
    if found:
        path, index = found[0]
        index = refresh(root, index, names, path, tick)
    else:
        log.warning('data: %s has shards without an index; building one (reads every shard once)', root)
        index = index_shards(root, names, tick=tick)
    store_index(index, root)
    return index


def lock_path(root: Path) -> Path:
    """Beside the index file: in root when it is writable, else beside the cached index."""
    if writable(root):
        return root / LOCK_NAME
    path = cached_index_path(root)
    path.parent.mkdir(parents=True, exist_ok=True)
    return path.with_name(path.name + '.lock')


def index_files(root: Path) -> list[Path]:
    """The index files of root that exist: beside the shards, then in the user cache."""
    return [p for p in (Path(root) / INDEX_NAME, cached_index_path(root)) if p.is_file()]


def load_index_file(root: Path):
    """The first index file of root as it is (unchecked), or None."""
    files = index_files(root)
    return read_index(files[0]) if files else None


def index_shards(root: Path, names: list[str], workers: int = 1, tick: Callable[[], None] = lambda: None) -> Index:
    """Walk and checksum every shard, in `workers` processes (scan_dataset.py) or in this one (a rank; `tick`
    after each shard keeps its lock fresh). The notes are logged once, here."""
    paths = [root / n for n in names]
    if workers > 1:
        from concurrent.futures import ProcessPoolExecutor

        with ProcessPoolExecutor(workers) as pool:
            walks, descs = list(pool.map(walk_shard, paths)), list(pool.map(describe_shard, paths))
    else:
        walks, descs = [], []
        for p in paths:
            walks.append(walk_shard(p))
            descs.append(describe_shard(p))
            tick()
    index = build_index(root, descs, [w[0] for w in walks])
    index.meta['notes'] = merge_notes([w[1] for w in walks])
    report_notes(root, index.meta['notes'])
    return index


def stale_shards(root: Path, index: Index, names: list[str], where: Path) -> list[str]:
    """Shards whose size or mtime_ns differ from the index, or that it does not list (one stat a shard). A shard
    the index lists but root lacks is refused."""
    listed = {s['name']: s for s in index.shards}
    missing = sorted(set(listed) - set(names))
    if missing:
        raise ShardError(
            f'{root / missing[0]}: listed in the index {where} but missing ({len(missing)} shard(s) missing); '
            'restore it, or delete the index to index the shards that are there'
        )
    stale = []
    for n in names:
        st, rec = (root / n).stat(), listed.get(n)
        if rec is None or rec['size'] != st.st_size or rec['mtime_ns'] != st.st_mtime_ns:
            stale.append(n)
    return stale


def refresh(root: Path, index: Index, names: list[str], where: Path, tick: Callable[[], None] = lambda: None) -> Index:
    """The index made valid for the shards now in root: a stale shard is checksummed; the same bytes only get their
    new mtime recorded, others are walked again."""
    listed = {s['name']: s for s in index.shards}
    rewalk = []
    for n in stale_shards(root, index, names, where):
        desc, rec = describe_shard(root / n), listed.get(n)
        if rec is not None and rec['size'] == desc['size'] and rec['crc32'] == desc['crc32']:
            rec['mtime_ns'] = desc['mtime_ns']  # same bytes, new mtime: a copy that did not keep times
        else:
            rewalk.append(n)
    if not rewalk:
        log.warning('data: shards of %s have new mtimes and unchanged checksums; index %s updated', root, where)
        return index
    why = 'new' if all(n not in listed for n in rewalk) else 'size or checksum differ from the index'
    log.warning('data: %s: %s (%s); indexing them again', root, ', '.join(rewalk), why)
    return _reindex(root, index, names, set(rewalk), tick)


def _reindex(root: Path, index: Index, names: list[str], rewalk: set, tick: Callable[[], None]) -> Index:
    """A new index with the shards of `rewalk` walked again; the others' records, and scan exclusions, kept."""
    listed = {s['name']: i for i, s in enumerate(index.shards)}
    descs, records, excluded, notes = [], [], [], []
    for n in names:
        if n in rewalk:
            descs.append(describe_shard(root / n))
            recs, note = walk_shard(root / n)
            records.append(recs)
            notes.append(note)
            excluded.append(np.zeros(len(recs), bool))
            tick()
            continue
        s = listed[n]
        rows = np.flatnonzero(index.shard == s)
        descs.append(dict(index.shards[s]))
        records.append([(index.name[r], int(index.offset[r]), int(index.size[r]), int(index.label[r])) for r in rows])
        excluded.append(index.excluded[rows] if index.excluded is not None else np.zeros(len(rows), bool))
    new = build_index(root, descs, records)
    new.meta = dict(index.meta, version=VERSION, notes=merge_notes(notes))
    report_notes(root, new.meta['notes'])
    new.excluded = np.concatenate(excluded) if excluded else None
    return new


def writable(folder: Path) -> bool:
    return os.access(folder, os.W_OK)


def store_index(index: Index, root: Path) -> Path:
    """Beside the shards when that folder is writable, else in the user cache."""
    if writable(root):
        try:
            save_index(index, root / INDEX_NAME)
            return root / INDEX_NAME
        except OSError:
            pass
    path = cached_index_path(root)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_index(index, path)
    log.warning('data: %s is read-only; its shard index is cached in %s', root, path)
    return path
