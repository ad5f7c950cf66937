"""data.source=shards: the samples of a folder of webdataset tars, read by index with os.pread.

`ShardSamples` is the (path, label) list the other sources give, with `read(i)`: sample i's image bytes, read
from its shard at the offset the index records (one pread; never the whole shard). Its "path" names the shard and
the member, '<root>/<shard>.tar:<member>', so bad-record messages read like bad-file messages. Shards are opened
on first read and kept open; pread has no file position, so forked DataLoader workers may share the descriptors.
"""

from __future__ import annotations

import io
import os
from pathlib import Path
from typing import Iterator

import numpy as np

from .shard_index import Index, ShardError, load_index


class ShardSamples:
    """Sequence of (name, label) over an Index, plus read(i) -> bytes and labels (n,) int64."""

    def __init__(self, root: str | os.PathLike, index: Index):
        self.root, self.index = Path(root), index
        self.paths = [str(self.root / s['name']) for s in index.shards]
        self._fds: dict[int, int] = {}

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, i: int) -> tuple[str, int]:
        ix = self.index
        return f'{self.paths[ix.shard[i]]}:{ix.name[i].decode()}', int(ix.label[i])

    def __iter__(self) -> Iterator[tuple[str, int]]:
        return (self[i] for i in range(len(self)))

    @property
    def labels(self) -> np.ndarray:
        return self.index.label

    def read(self, i: int) -> bytes:
        ix = self.index
        s, size = int(ix.shard[i]), int(ix.size[i])
        data = os.pread(self._fd(s), size, int(ix.offset[i]))
        if len(data) != size:
            raise ShardError(
                f'{self.paths[s]}: truncated at key {ix.name[i].decode()} ({len(data)} of {size} bytes); '
                'the shard changed after it was indexed'
            )
        return data

    def _fd(self, s: int) -> int:
        fd = self._fds.get(s)
        if fd is None:
            fd = self._fds[s] = os.open(self.paths[s], os.O_RDONLY)
        return fd

    def __getstate__(self) -> dict:  # spawned workers open their own
        return dict(self.__dict__, _fds={})

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds = {}

    def __del__(self) -> None:
        if getattr(self, '_fds', None):
            self.close()


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
