"""Where images come from: list (path, label) pairs for every source of `DataConfig`.

Formats:
- 'folder': ImageNet-style `root/<class>/<image>`; label = index of the class folder in sorted order.
- 'json': the official CMAE annotation file (`ImageNet_train.json`): a JSON list of
  `{"prefix": "train", "filename": "n01440764/x.JPEG", "label": 0}`, path = root/prefix/filename (prefix and
  label optional). The mmengine form `{"metainfo": {"classes": [...]}, "data_list": [{"img_path", "gt_label"}]}`
  is read too.
- 'filelist': text, one path per line (relative to root unless absolute), optionally followed by whitespace and
  an integer label; blank lines and lines starting with '#' are ignored.
- 'embedded': the photographs shipped in cmae_ds/data/embedded (label -1).
- 'shards': webdataset tars in root, read by index (shards.py; labels from '.cls', -1 without).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from ..errors import DataFileError, DataSourceError  # noqa: F401 (DataFileError: re-exported)

IMAGE_EXTENSIONS = ('.jpg', '.jpeg', '.png', '.bmp', '.tif', '.tiff', '.webp', '.ppm', '.pgm', '.pbm', '.pnm')
EMBEDDED_DIR = Path(__file__).parents[1] / 'embedded'

Sample = tuple[str, int]


def is_image_name(name: str) -> bool:
    return name.lower().endswith(IMAGE_EXTENSIONS)


def list_samples(data_cfg) -> list[Sample]:
    """(path, label) for every image of `data_cfg.source`, in a fixed order; label -1 when the source has none."""
    source = data_cfg.source
    if source == 'folder':
        samples = folder_samples(data_cfg.root)
    elif source == 'json':
        samples = json_samples(_resolve_ann(data_cfg), data_cfg.root)
    elif source == 'filelist':
        samples = filelist_samples(_resolve_ann(data_cfg), data_cfg.root)
    elif source == 'embedded':
        samples = embedded_samples()
    elif source == 'shards':
        from .shards import shard_samples

        samples = shard_samples(data_cfg.root)
    elif source == 'synthetic':
        return []
    else:
        raise DataSourceError(f'data.source {source!r} has no file listing')
    if not samples:
        where = data_cfg.ann_file or data_cfg.root or EMBEDDED_DIR
        raise DataSourceError(f'data.source {source!r}: no images found in {where}')
    return samples


def _resolve_ann(data_cfg) -> Path:
    """The annotation file as given, or relative to root (the official configs name it relative to data_root)."""
    p = Path(data_cfg.ann_file)
    if not p.exists() and data_cfg.root and (Path(data_cfg.root) / p).exists():
        p = Path(data_cfg.root) / p
    if not p.exists():
        raise DataSourceError(
            f'data.ann_file {data_cfg.ann_file} not found (also tried under data.root {data_cfg.root!r})'
        )
    return p


def folder_classes(root: str | os.PathLike) -> list[str]:
    rootp = Path(root)
    if not rootp.is_dir():
        raise DataSourceError(f'data.root {root} is not a directory')
    return sorted(d.name for d in rootp.iterdir() if d.is_dir() and not d.name.startswith('.'))


def folder_samples(root: str | os.PathLike) -> list[Sample]:
    """ImageNet-style folder; images directly in root (no class folders) get label -1."""
    rootp = Path(root)
    classes = folder_classes(rootp)
    samples: list[Sample] = []
    for label, name in enumerate(classes):
        for dirpath, dirnames, filenames in os.walk(rootp / name, followlinks=True):
            dirnames.sort()
            samples += [(os.path.join(dirpath, f), label) for f in sorted(filenames) if is_image_name(f)]
    if not classes:
        samples = [(str(p), -1) for p in sorted(rootp.iterdir()) if p.is_file() and is_image_name(p.name)]
    return samples


def json_samples(ann_file: str | os.PathLike, root: str = '') -> list[Sample]:
    try:
        data = json.loads(Path(ann_file).read_text())
    except json.JSONDecodeError as e:
        raise DataSourceError(f'{ann_file}: not valid JSON: {e}') from None
    if isinstance(data, dict) and 'data_list' in data:
        items = [(d.get('img_path'), d.get('gt_label', -1)) for d in data['data_list']]
        key = 'img_path'
    elif isinstance(data, list):
        items = [
            (os.path.join(d.get('prefix', ''), d['filename']) if 'filename' in d else None, d.get('label', -1))
            for d in data
        ]
        key = 'filename'
    else:
        raise DataSourceError(
            f'{ann_file}: expected a list of {{"prefix", "filename", "label"}} (official CMAE) '
            'or {"data_list": [...]} (mmengine)'
        )
    samples = []
    for i, (path, label) in enumerate(items):
        if not path:
            raise DataSourceError(f'{ann_file}: entry {i} has no {key!r}')
        samples.append((os.path.join(root, path), int(label)))
    return samples


def filelist_samples(ann_file: str | os.PathLike, root: str = '') -> list[Sample]:
    samples = []
    for line in Path(ann_file).read_text().splitlines():
        line = line.strip()
        if not line or line.startswith('#'):
            continue
        path, label = line, -1
        head, _, tail = line.rpartition(' ') if ' ' in line else line.rpartition('\t')
        if head and tail.lstrip('-').isdigit():
            path, label = head.rstrip(), int(tail)
        samples.append((os.path.join(root, path), label))
    return samples


def embedded_samples() -> list[Sample]:
    return [(str(p), -1) for p in sorted(EMBEDDED_DIR.glob('*.jpg'))]


def write_official_json(root: str | os.PathLike, out: str | os.PathLike, prefix: str = '') -> int:
    """Write the official CMAE annotation JSON for an ImageNet-style folder; returns the number of entries.

    `filename` is relative to `root`; set data.root so that data.root/prefix is `root`. Labels by sorted class folder.
    """
    rootp = Path(root)
    entries = []
    for path, label in folder_samples(rootp):
        rel = os.path.relpath(path, rootp)
        # The official loader joins data_root/prefix/filename and needs the key even when it is empty.
        entries.append({'prefix': prefix, 'filename': rel, 'label': label})
    Path(out).write_text(json.dumps(entries))
    return len(entries)


def write_filelist(samples: list[Sample], out: str | os.PathLike, root: str = '') -> None:
    """Write a file list (paths relative to root when under it), label after a space when known."""
    lines = []
    for path, label in samples:
        rel = os.path.relpath(path, root) if root and not os.path.relpath(path, root).startswith('..') else path
        lines.append(f'{rel} {label}' if label >= 0 else rel)
    Path(out).write_text('\n'.join(lines) + ('\n' if lines else ''))
