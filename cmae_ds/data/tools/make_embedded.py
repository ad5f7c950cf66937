"""Regenerate cmae_ds/data/embedded/: small JPEG crops of public-domain / CC0 scikit-image sample photographs.

    python -m cmae_ds.data.tools.make_embedded [--count 128] [--seed 0]

Needs scikit-image only here; the committed JPEGs are read at run time without it.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from PIL import Image

from ..sources.files import EMBEDDED_DIR

# skimage.data function -> (license as stated in its docstring, credit). Only public-domain / CC0 photographs.
SOURCES = {
    'astronaut': ('public domain', 'NASA, Eileen Collins (NASA Great Images database)'),
    'chelsea': ('CC0', 'Stefan van der Walt'),
    'coffee': ('CC0', 'Rachel Michetti, courtesy of Pikolo Espresso Bar'),
    'rocket': ('public domain', 'SpaceX, DSCOVR launch on Falcon 9'),
    'hubble_deep_field': ('public domain', 'NASA, Hubble eXtreme Deep Field'),
    'camera': ('CC0', 'Lav Varshney (grayscale)'),
}


def random_crop(rng: np.random.Generator, img: Image.Image) -> Image.Image:
    """A crop of 15-70 % of the area, aspect 3/4-4/3, resized so its sides lie in [160, 256]."""
    w, h = img.size
    for _ in range(50):
        area = w * h * rng.uniform(0.15, 0.7)
        ratio = np.exp(rng.uniform(np.log(3 / 4), np.log(4 / 3)))
        cw, ch = int(np.sqrt(area * ratio)), int(np.sqrt(area / ratio))
        if cw <= w and ch <= h:
            break
    else:
        cw, ch = min(w, h), min(w, h)
    left, top = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
    side = int(rng.integers(160, 257))
    scale = side / max(cw, ch)
    size = (max(160, int(cw * scale)), max(160, int(ch * scale)))
    return img.resize(size, Image.BICUBIC, box=(left, top, left + cw, top + ch))


def make_embedded(out: Path = EMBEDDED_DIR, count: int = 128, seed: int = 0) -> list[Path]:
    from skimage import data as skdata

    rng = np.random.default_rng(seed)
    out.mkdir(parents=True, exist_ok=True)
    for old in out.glob('*.jpg'):
        old.unlink()
    names = list(SOURCES)
    written = []
    for i in range(count):
        name = names[i % len(names)]
        arr = getattr(skdata, name)()
        img = Image.fromarray(arr).convert('L' if arr.ndim == 2 else 'RGB')
        path = out / f'{name}_{i:03d}.jpg'
        random_crop(rng, img).save(path, quality=88)
        written.append(path)
    (out / 'README.md').write_text(_readme(count, seed))
    return written


def _readme(count: int, seed: int) -> str:
    rows = '\n'.join(f'| `{n}` | {lic} | {credit} |' for n, (lic, credit) in SOURCES.items())
    return f"""# Embedded sample photographs

{count} JPEG crops (sides 160-256 px) cut from scikit-image's sample images (`skimage.data`), used by
`python launch/pretrain.py` with no arguments (data.source: embedded). Each file is named after its source image.
Regenerate with `python -m cmae_ds.data.tools.make_embedded --count {count} --seed {seed}`.

Only photographs whose license, as stated in scikit-image's `skimage/data/_fetchers.py` docstrings, is public
domain or CC0 are used:

| skimage.data image | license | credit |
|---|---|---|
{rows}

The crops are derived works of these public-domain / CC0 images and are likewise free of copyright restrictions.
The `camera` crops are grayscale JPEGs on purpose: they exercise the grayscale -> RGB decode path.
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument('--count', type=int, default=128)
    ap.add_argument('--seed', type=int, default=0)
    ap.add_argument('--out', type=Path, default=EMBEDDED_DIR)
    args = ap.parse_args()
    paths = make_embedded(args.out, args.count, args.seed)
    total = sum(p.stat().st_size for p in paths)
    print(f'wrote {len(paths)} JPEGs, {total / 1e6:.2f} MB, to {args.out}')


if __name__ == '__main__':
    main()
