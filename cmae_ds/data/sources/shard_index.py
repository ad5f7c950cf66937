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

Samples are grouped as the webdataset library groups them (webdataset 1.0.2, tariterators.py: base_plus_ext splits
'dir/key.ext.ext2' at the first dot of the last component into key 'dir/key' and suffix 'ext.ext2', lowercased;
group_by_keys starts a sample wherever the key differs from the previous member's and raises on a suffix repeated
inside one sample; tar_file_iterator skips non-regular members and '__...__' metadata members). The image of a
sample is its first member whose last extension is an image's (autodecode.py's imagehandler looks at the last one
too). Member names are kept as the bytes the tar holds (tarfile's surrogateescape names encoded back), so names
that are not UTF-8 index and read like others. Samples without an image are left out and counted; a key that comes
back after other keys (two samples with one key, as webdataset reads them) is counted; both are reported once, when
the index is built, with the first shard, key and byte offset.

One process builds the index (load_index): it creates a lock file with O_EXCL beside the index file, writes the
index to a mkstemp file in the same folder and renames it; the other ranks wait for the lock to go and read the
result. A lock whose process is gone (same host), or not touched for STALE_LOCK_S (the builder touches it after
every shard), is taken over.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import socket
import tarfile
import tempfile
import time
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import numpy as np

from ..errors import DataSourceError, ShardError

log = logging.getLogger(__name__)

INDEX_NAME = 'shards.index.npz'
VERSION = 1
IMAGE_EXTS = ('jpg', 'jpeg', 'png', 'webp', 'bmp', 'ppm', 'pgm', 'pbm', 'pnm', 'tif', 'tiff')
CHUNK = 8 << 20
BLOCK = 512
LOCK_NAME = '.shards.index.lock'
STALE_LOCK_S = 600.0
LOCKING = True  # the benchmark turns it off to time every rank building its own index
WDS_KEY = re.compile(r'^((?:.*/|)[^.]+)[.]([^/]*)$')  # webdataset 1.0.2 tariterators.base_plus_ext
WDS_META = re.compile(r'__[^/]*__($|/)')  # tar_file_iterator's skip_meta


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


def file_crc32(path: Path) -> int:
    crc = 0
    with open(path, 'rb') as f:
        while block := f.read(CHUNK):
            crc = zlib.crc32(block, crc)
    return crc


def split_key(member: str) -> tuple[Optional[str], str]:
    """webdataset's base_plus_ext: (key, lowercased suffix), or (None, '') for a name it skips (no dot)."""
    m = WDS_KEY.match(member)
    return (m.group(1), m.group(2).lower()) if m else (None, '')


def is_image_suffix(suffix: str) -> bool:
    return suffix.rpartition('.')[2] in IMAGE_EXTS


def shown(name) -> str:
    """A member name for a message: bytes that are not UTF-8 as escapes, on one line."""
    if isinstance(name, bytes):
        name = name.decode('utf-8', 'backslashreplace')
    return name.encode('utf-8', 'backslashreplace').decode()


def raw_name(name: str) -> bytes:
    """tarfile's name back to the bytes of the tar (it decodes with surrogateescape)."""
    return name.encode('utf-8', 'surrogateescape')


def walk_shard(path: Path) -> tuple[list[tuple[bytes, int, int, int]], dict]:
    """(records, notes) of one tar. records: (image member name, data offset, size, label) of every sample, in file
    order; a sample is the consecutive members sharing a key (webdataset's rule), its label the integer in its 'cls'
    member (-1 without one). notes: {'no_image' | 'repeated_key' | 'extra_images': [count, first]}, first being
    (shard, key, byte offset) or None."""
    path = Path(path)
    end = path.stat().st_size
    walk = _Walk(path)
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
                    raise ShardError(f'{path}: truncated at key {walk.last} (its blocks run past the end)') from None
                raise ShardError(f'{path}: corrupt tar header after key {walk.last} ({e})') from None
            if m is None:
                break
            if m.offset_data + m.size > end:
                key = split_key(m.name)[0] or m.name
                raise ShardError(f'{path}: truncated at key {shown(key)} (its data runs past the end)')
            tf.members = []  # headers only; keeps a 1 GB shard's walk in constant memory
            if m.isreg() and not WDS_META.match(m.name) and not (m.name.startswith('__') and m.name.endswith('__')):
                walk.member(f, m)
        _check_tail(f, tf.offset, end, path, walk.last)
    return walk.finish()


class _Walk:
    """The grouping state of walk_shard."""

    def __init__(self, path: Path):
        self.path, self.records, self.seen = path, [], set()
        self.key, self.cur, self.suffixes, self.last = None, None, set(), 'the start of the file'
        self.notes = dict(no_image=[0, None], repeated_key=[0, None], extra_images=[0, None])

    def member(self, f, m: tarfile.TarInfo) -> None:
        key, suffix = split_key(m.name)
        if key is None:
            return
        if key != self.key:
            self._flush()
            if key in self.seen:
                self._note('repeated_key', key, m.offset)
            self.seen.add(key)
            self.key, self.cur, self.suffixes = key, [None, 0, 0, -1, m.offset], set()
        elif suffix in self.suffixes:  # webdataset: ValueError 'duplicate file name in tar file'
            raise ShardError(
                f'{self.path}: key {shown(key)} holds a second {shown(suffix)!r} member at byte {m.offset} '
                '(webdataset refuses this too: duplicate file name); give each sample its own key'
            )
        self.suffixes.add(suffix)
        if is_image_suffix(suffix) and self.cur[0] is None:
            self.cur[:3] = raw_name(m.name), m.offset_data, m.size
        elif is_image_suffix(suffix):
            self._note('extra_images', key, m.offset)
        elif suffix == 'cls':
            self.cur[3] = _read_cls(f, m, self.path)
        self.last = shown(key)

    def _note(self, what: str, key: str, offset: int) -> None:
        n = self.notes[what]
        n[0] += 1
        n[1] = n[1] or (self.path.name, shown(key), offset)

    def _flush(self) -> None:
        if self.cur is None:
            return
        if self.cur[0] is None:
            self._note('no_image', self.key, self.cur[4])
        else:
            self.records.append(tuple(self.cur[:4]))

    def finish(self):
        self._flush()
        self.cur = None
        return self.records, self.notes


def merge_notes(notes: list[dict]) -> dict:
    out = dict(no_image=[0, None], repeated_key=[0, None], extra_images=[0, None])
    for n in notes:
        for k, (count, first) in n.items():
            out[k][0] += count
            out[k][1] = out[k][1] or first
    return out


NOTE_TEXT = dict(
    no_image='sample(s) without an image member, left out',
    repeated_key='key(s) that come back after other keys, read as separate samples (as webdataset reads them)',
    extra_images="image member(s) beside a sample's first image, not read (webdataset groups 'a.1.jpg', 'a.2.jpg'"
    " under key 'a')",
)


def report_notes(root: Path, notes: dict) -> list[str]:
    """One line per kind of note (logged once, when the index is built; launch/scan_dataset.py prints them)."""
    lines = []
    for k, (count, first) in notes.items():
        if count and k in NOTE_TEXT:
            shard, key, offset = first
            lines.append(f'{root}: {count} {NOTE_TEXT[k]}; first: {shard} key {key} at byte {offset}')
    for line in lines:
        log.warning('data: %s', line)
    return lines


def _read_cls(f, m: tarfile.TarInfo, path: Path) -> int:
    text = os.pread(f.fileno(), m.size, m.offset_data).decode('utf-8', 'replace').strip()
    try:
        return int(text)
    except ValueError:
        raise ShardError(
            f'{path}: key {shown(split_key(m.name)[0])}: .cls holds {text[:40]!r}, not an integer'
        ) from None


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
                return _valid_index(root, names) or _build(root, names, lambda: _touch(lock))
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


def take_lock(lock: Path) -> bool:
    try:
        fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
        return False
    with os.fdopen(fd, 'w') as f:
        f.write(f'{socket.gethostname()} {os.getpid()}\n')
    return True


def _touch(lock: Path) -> None:
    try:
        os.utime(lock)
    except OSError:
        pass


def wait_for_lock(lock: Path, root: Path, poll: float = 0.05) -> None:
    """Until the lock is gone; a lock left by a dead builder is removed (the caller then takes it). The poll backs
    off to 2 s: a thousand waiting ranks are a thousand stats a poll on the shards' file server."""
    log.info('data: waiting for another process to index %s (%s)', root, lock)
    while True:
        try:
            text, age = lock.read_text(), time.time() - lock.stat().st_mtime
        except FileNotFoundError:
            return
        if _abandoned(text, age):
            log.warning('data: %s was left by a builder that is gone (%s); taking it over', lock, text.strip())
            lock.unlink(missing_ok=True)
            return
        time.sleep(poll)
        poll = min(2.0, poll * 1.5)


def _abandoned(text: str, age: float) -> bool:
    if age > STALE_LOCK_S:
        return True
    host, _, pid = text.strip().partition(' ')
    if host != socket.gethostname() or not pid.isdigit():
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return False


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
