"""Walking one webdataset tar: its samples (image member, byte offset, size, label) and what it holds that no
pipeline reads.

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
"""

from __future__ import annotations

import logging
import os
import re
import tarfile
import zlib
from pathlib import Path
from typing import Optional

from ..errors import ShardError

log = logging.getLogger(__name__)

IMAGE_EXTS = ('jpg', 'jpeg', 'png', 'webp', 'bmp', 'ppm', 'pgm', 'pbm', 'pnm', 'tif', 'tiff')
CHUNK = 8 << 20
BLOCK = 512
WDS_KEY = re.compile(r'^((?:.*/|)[^.]+)[.]([^/]*)$')  # webdataset 1.0.2 tariterators.base_plus_ext
WDS_META = re.compile(r'__[^/]*__($|/)')  # tar_file_iterator's skip_meta


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
