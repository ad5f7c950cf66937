"""Shard folders for test_shards_at_scale.py: tiny JPEG folders packed with make_shards' code, and tars written by hand
the way other tools write them."""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

import numpy as np
from PIL import Image

from cmae_ds.data import list_samples
from cmae_ds.data.sources.packing import pack

from data_helpers import cfg, random_jpegs


def packed_folder(tmp: Path, n: int, shard_bytes: int, size=(48, 40), classes: int = 2) -> tuple[Path, Path]:
    """(image folder, its shards) for n random JPEGs."""
    folder = tmp / 'folder'
    random_jpegs(folder, n, classes=classes, size=size)
    out = tmp / 'shards'
    pack(list_samples(cfg(folder, 'torch')), out, shard_bytes, workers=1, progress=False)
    return folder, out


def jpeg(seed: int, size=(24, 20)) -> bytes:
    arr = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, 'JPEG')
    return buf.getvalue()


def write_tar(path: Path, items: list[tuple[str, bytes]], encoding: str = 'utf-8') -> None:
    """A tar of (member name, bytes); encoding='latin-1' writes names as an old Latin-1 tar holds them."""
    with tarfile.open(path, 'w', format=tarfile.GNU_FORMAT, encoding=encoding) as tf:
        for name, blob in items:
            info = tarfile.TarInfo(name)
            info.size = len(blob)
            tf.addfile(info, io.BytesIO(blob))


def corrupt_record(samples, i: int) -> None:
    """Random bytes over sample i's image after its first 200 (header kept: it is found, but does not decode)."""
    shard = Path(samples[i][0].rsplit(':', 1)[0])
    r = samples.row(i)
    off, size = int(samples.index.offset[r]), int(samples.index.size[r])
    data = bytearray(shard.read_bytes())
    data[off + 200 : off + size] = bytes(np.random.default_rng(1).integers(0, 256, size - 200, dtype=np.uint8))
    shard.write_bytes(bytes(data))
