"""Real image files for the data tests (written with PIL into tmp dirs) and small config helpers."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from PIL import Image

from cmae_ds.config import DataConfig

PIPELINES = ('torch', 'dali', 'torch_gpu')  # torch_gpu runs on CPU tensors here


def coord_image(width: int, height: int) -> Image.Image:
    """RGB whose pixels encode their coordinates: R = x, G = y (both scaled to 0-255), B = 255 - R."""
    x = np.linspace(0, 255, width)[None, :].repeat(height, 0)
    y = np.linspace(0, 255, height)[:, None].repeat(width, 1)
    arr = np.stack([x, y, 255 - x], -1).round().astype(np.uint8)
    return Image.fromarray(arr)


def solid_image(width: int, height: int, rgb=(200, 50, 120)) -> Image.Image:
    return Image.new('RGB', (width, height), tuple(rgb))


def write_folder(root: Path, images: dict[str, list[Image.Image]], ext: str = '.png', **save_kw) -> list[str]:
    """root/<class>/<i><ext> for each class; returns the paths in list_samples order."""
    paths = []
    for cls in sorted(images):
        os.makedirs(root / cls, exist_ok=True)
        for i, img in enumerate(images[cls]):
            p = root / cls / f'{i:04d}{ext}'
            img.save(p, **save_kw)
            paths.append(str(p))
    return paths


def random_jpegs(root: Path, n: int, classes: int = 2, size=(96, 72), seed: int = 0) -> list[str]:
    """n small random-content JPEGs in an ImageNet-style folder."""
    rng = np.random.default_rng(seed)
    per = {f'c{c}': [] for c in range(classes)}
    for i in range(n):
        arr = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
        per[f'c{i % classes}'].append(Image.fromarray(arr))
    return write_folder(root, per, '.jpg', quality=90)


def cfg(root: Path, pipeline: str, workers: int = 2, extra: int = 32, source: str = 'folder', ann: str = ''):
    return DataConfig(
        source=source, root=str(root), ann_file=ann, pipeline=pipeline, num_workers=workers, master_extra=extra
    )


def plant_bad_files(cls_dir: Path, good_jpeg: str) -> list[str]:
    """Four kinds of unreadable file with image names: truncated JPEG, corrupt bytes, text, zero bytes."""
    data = Path(good_jpeg).read_bytes()
    bad = {
        'truncated.jpg': data[: len(data) // 3],
        'corrupt.jpg': data[:200] + bytes(np.random.default_rng(1).integers(0, 256, 3000, dtype=np.uint8)),
        'text.jpg': b'this is not an image\n' * 20,
        'empty.jpg': b'',
    }
    paths = []
    for name, blob in bad.items():
        p = cls_dir / name
        p.write_bytes(blob)
        paths.append(str(p))
    return paths
