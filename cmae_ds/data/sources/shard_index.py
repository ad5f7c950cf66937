"""The index of a folder of webdataset shards: where each sample's image lies (shard, byte offset, size) and its
label, so that samples are read by index and sampling, draws and resume stay those of a folder of files.

The index file (INDEX_NAME) sits beside the shards, or in the user cache (cache_dir) when that folder is read-only.
Per shard it records size, mtime and CRC-32. Every start compares size and mtime of each shard (one stat a shard);
only a shard whose stat differs is read in full: if its CRC-32 still matches (a copy that did not keep mtimes), the
record is refreshed, otherwise the shard is walked again. A shard the index lists but the folder lacks is refused.
The full checksum runs on a rebuild and in launch/scan_dataset.py, not on every start: it reads the whole dataset.

Walking a tar is strict where the standard tarfile module is lenient (it ends an archive quietly at a corrupt
header and does not check that a member's data is there): a member whose data runs past the end of the file, or
bytes that are neither a header nor end-of-archive padding, stop with one line naming the shard and the key.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tarfile
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import DataSourceError, ShardError

log = logging.getLogger(__name__)

INDEX_NAME = 'shards.index.npz'
VERSION = 1
IMAGE_EXTS = ('jpg', 'jpeg', 'png', 'webp', 'bmp', 'ppm', 'pgm', 'pbm', 'pnm', 'tif', 'tiff')
CHUNK = 8 << 20
BLOCK = 512


@dataclass
class Index:
    """Per sample: shard (int32), offset and size (int64) of the image bytes, label (int64; -1 without .cls), name
    (bytes: the image member's name). Per shard: {'name', 'size', 'mtime_ns', 'crc32', 'samples'}."""

    shards: list[dict]
    shard: np.ndarray
    offset: np.ndarray
    size: np.ndarray
    label: np.ndarray
    name: np.ndarray
    meta: dict

    def __len__(self) -> int:
        return len(self.shard)


def shard_names(root: Path) -> list[str]:
    return sorted(p.name for p in Path(root).iterdir() if p.name.endswith('.tar') and p.is_file())


def file_crc32(path: Path) -> int:
    crc = 0
    with open(path, 'rb') as f:
        while block := f.read(CHUNK):
            crc = zlib.crc32(block, crc)
    return crc


def split_key(member: str) -> tuple[str, str]:
    """webdataset's convention: the key is the name up to the first dot of its last component."""
    head, _, base = member.rpartition('/')
    stem, _, ext = base.partition('.')
    return (f'{head}/{stem}' if head else stem), ext.lower()


def walk_shard(path: Path) -> list[tuple[str, int, int, int]]:
    """(image member name, data offset, size, label) of every sample of one tar, in file order. A sample is the
    consecutive members sharing a key; its image is the first member with an image extension, its label the integer
    in its '.cls' member (-1 without one); keys with no image are left out."""
    path = Path(path)
    end = path.stat().st_size
    samples, key, cur, last = [], None, None, 'the start of the file'
    with open(path, 'rb') as f:
        try:
            tf = tarfile.open(fileobj=f, mode='r:')
        except tarfile.TarError as e:
            raise ShardError(f'{path}: not a readable tar ({e}); first bad key: the first one') from None
        while True:
            try:
                m = tf.next()
            except tarfile.TarError as e:  # it checks that the previous member's blocks are all there
                if 'unexpected end of data' in str(e):
                    raise ShardError(f'{path}: truncated at key {last} (its blocks run past the end)') from None
                raise ShardError(f'{path}: corrupt tar header after key {last} ({e})') from None
            if m is None:
                break
            if m.offset_data + m.size > end:
                raise ShardError(f'{path}: truncated at key {split_key(m.name)[0]} (its data runs past the end)')
            tf.members = []  # headers only; keeps a 1 GB shard's walk in constant memory
            if not m.isfile():
                continue
            k, ext = split_key(m.name)
            if k != key:
                _flush(samples, cur)
                key, cur = k, [None, 0, 0, -1]
            if ext in IMAGE_EXTS and cur[0] is None:
                cur[:3] = m.name, m.offset_data, m.size
            elif ext == 'cls':
                cur[3] = _read_cls(f, m, path)
            last = k
        _check_tail(f, tf.offset, end, path, last)
    _flush(samples, cur)
    return samples


def _flush(samples: list, cur) -> None:
    if cur is not None and cur[0] is not None:
        samples.append(tuple(cur))


def _read_cls(f, m: tarfile.TarInfo, path: Path) -> int:
    text = os.pread(f.fileno(), m.size, m.offset_data).decode('utf-8', 'replace').strip()
    try:
        return int(text)
    except ValueError:
        raise ShardError(f'{path}: key {split_key(m.name)[0]}: .cls holds {text[:40]!r}, not an integer') from None


def _check_tail(f, offset: int, end: int, path: Path, last: str) -> None:
    """tarfile stops at the first block that is not a valid header: only zero padding may follow it."""
    if 0 < end - offset < BLOCK:
        raise ShardError(f'{path}: truncated after key {last} (a partial tar header ends the file)')
    pos = offset
    while pos < end:
        block = os.pread(f.fileno(), min(CHUNK, end - pos), pos)
        if block.strip(b'\0'):
            at = pos + len(block) - len(block.lstrip(b'\0'))
            raise ShardError(f'{path}: corrupt tar header at byte {at}, after key {last}; the shard is damaged')
        pos += len(block)


def describe_shard(path: Path, crc: bool = True) -> dict:
    st = path.stat()
    out = dict(name=path.name, size=st.st_size, mtime_ns=st.st_mtime_ns)
    if crc:
        out['crc32'] = file_crc32(path)
    return out


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
    name = np.array([x.encode() for x in names], dtype=bytes) if names else np.array([], dtype='S1')
    return Index(shards, shard, offset, size, label, name, dict(version=VERSION))


def save_index(index: Index, path: Path) -> None:
    """Written to a temporary file of this process and renamed: several ranks may rebuild at once."""
    meta = dict(index.meta, shards=index.shards)
    tmp = path.with_name(f'{path.name}.{os.getpid()}.tmp')
    try:
        with open(tmp, 'wb') as f:
            np.savez(
                f,
                meta=np.array(json.dumps(meta)),
                shard=index.shard,
                offset=index.offset,
                size=index.size,
                label=index.label,
                name=index.name,
            )
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def read_index(path: Path) -> Index:
    try:
        with np.load(path, allow_pickle=False) as z:
            meta = json.loads(str(z['meta']))
            arrays = [z[k] for k in ('shard', 'offset', 'size', 'label', 'name')]
    except Exception as e:  # noqa: BLE001 - whatever numpy or json raise, the file is not our index
        raise ShardError(f'{path}: unreadable shard index ({type(e).__name__}: {e}); delete it to rebuild') from None
    if meta.get('version') != VERSION:
        raise ShardError(f'{path}: shard index version {meta.get("version")}, this code reads {VERSION}')
    return Index(meta.pop('shards'), *arrays, meta)


def cache_dir() -> Path:
    base = os.environ.get('XDG_CACHE_HOME') or os.path.join(os.path.expanduser('~'), '.cache')
    return Path(base) / 'cmae_ds' / 'shard_index'


def cached_index_path(root: Path) -> Path:
    digest = hashlib.sha1(str(Path(root).resolve()).encode()).hexdigest()[:16]
    return cache_dir() / f'{Path(root).resolve().name}-{digest}.npz'


def load_index(root: str | os.PathLike) -> Index:
    """The index of the shard folder `root`, checked against the shards; rebuilt (and cached) where stale."""
    root = Path(root)
    if not root.is_dir():
        raise DataSourceError(f'data.root {root} is not a directory')
    names = shard_names(root)
    if not names:
        raise DataSourceError(f'data.source shards: no .tar files in {root}')
    found = [(p, read_index(p)) for p in index_files(root)]
    for path, index in found:
        if not stale_shards(root, index, names, path):
            return index
    if found:
        path, index = found[0]
        index = refresh(root, index, names, path)
    else:
        log.warning('data: %s has shards without an index; building one (reads every shard once)', root)
        index = index_shards(root, names)
    store_index(index, root)
    return index


def index_files(root: Path) -> list[Path]:
    """The index files of root that exist: beside the shards, then in the user cache."""
    return [p for p in (Path(root) / INDEX_NAME, cached_index_path(root)) if p.is_file()]


def load_index_file(root: Path):
    """The first index file of root as it is (unchecked), or None."""
    files = index_files(root)
    return read_index(files[0]) if files else None


def index_shards(root: Path, names: list[str], workers: int = 1) -> Index:
    """Walk and checksum every shard, in `workers` processes (scan_dataset.py) or in this one (a rank)."""
    paths = [root / n for n in names]
    if workers > 1:
        from concurrent.futures import ProcessPoolExecutor

        with ProcessPoolExecutor(workers) as pool:
            records, descs = list(pool.map(walk_shard, paths)), list(pool.map(describe_shard, paths))
    else:
        records, descs = [walk_shard(p) for p in paths], [describe_shard(p) for p in paths]
    return build_index(root, descs, records)


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


def refresh(root: Path, index: Index, names: list[str], where: Path) -> Index:
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
    return _reindex(root, index, names, set(rewalk))


def _reindex(root: Path, index: Index, names: list[str], rewalk: set) -> Index:
    listed = {s['name']: i for i, s in enumerate(index.shards)}
    descs, records = [], []
    for n in names:
        if n in rewalk:
            descs.append(describe_shard(root / n))
            records.append(walk_shard(root / n))
            continue
        s = listed[n]
        rows = np.flatnonzero(index.shard == s)
        descs.append(dict(index.shards[s]))
        records.append(
            [(index.name[r].decode(), int(index.offset[r]), int(index.size[r]), int(index.label[r])) for r in rows]
        )
    new = build_index(root, descs, records)
    new.meta = dict(index.meta, version=VERSION)
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
