"""Dataset tools: find unreadable images in parallel, write clean file lists and official annotation files."""

from __future__ import annotations

import io
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from .sources import Sample, folder_samples, write_filelist, write_official_json


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
