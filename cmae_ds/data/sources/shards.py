"""data.source=shards: the samples of a folder of webdataset tars, read by index with os.pread.

`ShardSamples` is the (path, label) list the other sources give, with `read(i)`: sample i's image bytes, read
from its shard at the offset the index records (one pread; never the whole shard). Its "path" names the shard and
the member, '<root>/<shard>.tar:<member>', so bad-record messages read like bad-file messages. Records the scan
marked undecodable (Index.excluded) are not among the samples: every pipeline's epoch leaves them out, as a clean
file list leaves out a folder's bad files.

Open shards are held in a `ShardFiles` pool: at most `limit` descriptors (least recently used closed first), safe
under the DALI feed's threads. A random-order epoch over 10^3-10^5 shards touches them all, and an unbounded cache
of descriptors would run into RLIMIT_NOFILE; the soft limit is raised to the hard one when the pool is made. An
error of the file system (EMFILE, EIO, ESTALE, a vanished shard) is a ShardError naming the shard: a DataSourceError
that stops the run, never taken for an undecodable image and replaced by a neighbour.
"""

from __future__ import annotations

import errno
import io
import os
import resource
import threading
from collections import OrderedDict
from pathlib import Path
from typing import Iterator

import numpy as np

from .shard_index import Index, ShardError, load_index
from .tar_walk import shown

MAX_OPEN = 16384  # every shard of a large dataset where the limit allows: random order then opens nothing
OPEN_ENV = 'CMAE_DS_SHARD_OPEN_FILES'


def raise_file_limit() -> int:
    """The soft RLIMIT_NOFILE raised to the hard one where allowed; -> the soft limit now in force."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and soft < hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
        except (ValueError, OSError):
            pass
    return soft


def default_open_limit() -> int:
    """CMAE_DS_SHARD_OPEN_FILES, else a quarter of the file limit (sockets, pipes, DataLoader workers and torch's
    shared-memory handles need the rest), at most MAX_OPEN."""
    if os.environ.get(OPEN_ENV):
        return max(1, int(os.environ[OPEN_ENV]))
    soft = raise_file_limit()
    return max(4, min(MAX_OPEN, soft // 4)) if soft != resource.RLIM_INFINITY else MAX_OPEN


class ShardFiles:
    """A bounded LRU pool of read-only descriptors over `paths`. A descriptor in use by a read is never closed
    under it (the pool may then exceed `limit` by the number of concurrent reads). After a fork the child keeps the
    inherited descriptors (pread has no file position) with a new lock. Counts opens and reads."""

    def __init__(self, paths: list[str], limit: int):
        self.paths, self.limit = paths, limit
        self._reset()

    def _reset(self) -> None:
        self._lock, self._pid = threading.Lock(), os.getpid()
        self._open: OrderedDict[int, list] = OrderedDict()  # shard -> [fd, reads in flight]
        self.opens = self.reads = self.peak = 0

    def pread(self, s: int, size: int, offset: int, what: str) -> bytes:
        if self._pid != os.getpid():
            self._after_fork()
        fd = self._acquire(s)
        try:
            return os.pread(fd, size, offset)
        except OSError as e:
            raise ShardError(f'{self.paths[s]}: reading {what} at byte {offset} failed ({_why(e)})') from None
        finally:
            self._release(s)

    def _acquire(self, s: int) -> int:
        with self._lock:
            entry = self._open.get(s)
            if entry is not None:
                self._open.move_to_end(s)
                entry[1] += 1
                return entry[0]
        fd = self._open_fd(s)
        with self._lock:
            entry = self._open.get(s)
            if entry is None:  # else another thread opened it meanwhile: use that one
                entry = self._open[s] = [fd, 0]
                self.opens += 1
                fd = None
            entry[1] += 1
            self._evict(self.limit)
            self.peak = max(self.peak, len(self._open))
        if fd is not None:
            os.close(fd)
        return entry[0]

    def _open_fd(self, s: int) -> int:
        for attempt in (0, 1):
            try:
                return os.open(self.paths[s], os.O_RDONLY | getattr(os, 'O_CLOEXEC', 0))
            except OSError as e:
                if e.errno in (errno.EMFILE, errno.ENFILE) and attempt == 0:
                    with self._lock:
                        self._evict(0)  # descriptors this pool holds idle are the ones it can give back
                    continue
                soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
                raise ShardError(
                    f'{self.paths[s]}: cannot open the shard ({_why(e)}; this process holds {len(self._open)} shards '
                    f'open, file limit {soft}; see {OPEN_ENV} in docs/data.md)'
                ) from None
        raise AssertionError('unreachable')

    def _release(self, s: int) -> None:
        with self._lock:
            self.reads += 1
            entry = self._open.get(s)
            if entry is not None:
                entry[1] -= 1
            self._evict(self.limit)

    def _evict(self, keep: int) -> None:
        """Close least recently used idle descriptors until at most `keep` are open (caller holds the lock)."""
        if len(self._open) <= keep:
            return
        for s in [s for s, (_, users) in self._open.items() if users == 0][: len(self._open) - keep]:
            os.close(self._open.pop(s)[0])

    def _after_fork(self) -> None:
        held = {s: [fd, 0] for s, (fd, _) in self._open.items()}
        self._reset()
        self._open.update(held)

    def open_count(self) -> int:
        return len(self._open)

    def close(self) -> None:
        with self._lock:
            for fd, _ in self._open.values():
                os.close(fd)
            self._open.clear()

    def __del__(self) -> None:
        if getattr(self, '_open', None):
            self.close()

    def __getstate__(self) -> dict:  # spawned workers open their own
        return dict(paths=self.paths, limit=self.limit)

    def __setstate__(self, state: dict) -> None:
        self.__init__(state['paths'], state['limit'])


def _why(e: OSError) -> str:
    code = errno.errorcode.get(e.errno, str(e.errno)) if e.errno else type(e).__name__
    return f'{code}: {e.strerror or e}'


class ShardSamples:
    """Sequence of (name, label) over the records of an Index the scan did not exclude, plus read(i) -> bytes and
    labels (n,) int64."""

    def __init__(self, root: str | os.PathLike, index: Index, open_limit: int | None = None):
        self.root, self.index = Path(root), index
        self.paths = [str(self.root / s['name']) for s in index.shards]
        excluded = index.excluded
        self.rows = np.flatnonzero(~excluded) if excluded is not None and excluded.any() else None
        self.files = ShardFiles(self.paths, open_limit or default_open_limit())

    def __len__(self) -> int:
        return len(self.index) if self.rows is None else len(self.rows)

    def row(self, i: int) -> int:
        """The index record of sample i."""
        if not -len(self) <= i < len(self):
            raise IndexError(i)
        return int(i if self.rows is None else self.rows[i])

    def __getitem__(self, i: int) -> tuple[str, int]:
        r, ix = self.row(i), self.index
        return f'{self.paths[ix.shard[r]]}:{shown(ix.name[r])}', int(ix.label[r])

    def __iter__(self) -> Iterator[tuple[str, int]]:
        return (self[i] for i in range(len(self)))

    @property
    def labels(self) -> np.ndarray:
        return self.index.label if self.rows is None else self.index.label[self.rows]

    def read(self, i: int) -> bytes:
        r, ix = self.row(i), self.index
        s, size, name = int(ix.shard[r]), int(ix.size[r]), shown(ix.name[r])
        data = self.files.pread(s, size, int(ix.offset[r]), f'key {name}')
        if len(data) != size:
            raise ShardError(
                f'{self.paths[s]}: truncated at key {name} ({len(data)} of {size} bytes); '
                'the shard changed after it was indexed'
            )
        return data

    def close(self) -> None:
        self.files.close()


def shard_samples(root: str | os.PathLike) -> ShardSamples:
    return ShardSamples(root, load_index(root))


def record_file(samples, i: int):
    """What PIL opens for sample i: its path, or its bytes from a shard."""
    if isinstance(samples, ShardSamples):
        return io.BytesIO(samples.read(i))
    return samples[i][0]


def record_bytes(samples, i: int) -> bytes:
    if isinstance(samples, ShardSamples):
        return samples.read(i)
    return Path(samples[i][0]).read_bytes()
