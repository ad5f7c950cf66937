"""The model files the project writes (end of a run, extracted encoders, timm exports, classifier files), as
safetensors by default: tensors plus the file's description (format name, model config, classes, ...) as JSON in
the safetensors metadata under 'cmae_ds'. Reading one parses a JSON header and copies tensor bytes: nothing is
unpickled, so no scan is needed. A path ending .pt/.pth/.bin asks for the pickled format these files had before.

In memory both are the same dict: {'state_dict': tensors, **description}, so every reader works on either.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Union

from ..storage.output_dir import save_atomically, write_atomically
from .safe_load import CheckpointError

SUFFIX = '.safetensors'
PICKLE_SUFFIXES = ('.pt', '.pth', '.bin')
META_KEY = 'cmae_ds'
MODEL_FORMAT = 'cmae_ds.model'  # the whole CMAE (online and target), as pretraining ends


def is_safetensors(path: Union[str, Path]) -> bool:
    """By name, or by content: an 8-byte little-endian header length, then a JSON object that fits in the file."""
    path = Path(path)
    if path.suffix == SUFFIX:
        return True
    try:
        with open(path, 'rb') as f:
            head = f.read(9)
        size = path.stat().st_size
    except OSError:
        return False
    return len(head) == 9 and head[8:9] == b'{' and 8 + struct.unpack('<Q', head[:8])[0] <= size


RUN_MODEL = 'model' + SUFFIX  # the end-of-run model of a pretraining run
OLD_RUN_MODEL = 'model.pt'  # its name before safetensors, still read


def run_model_file(run_dir: Union[str, Path]) -> Path:
    """The end-of-run model in a pretraining run folder: model.safetensors, or an older run's model.pt."""
    run_dir = Path(run_dir)
    for name in (RUN_MODEL, OLD_RUN_MODEL):
        if (run_dir / name).is_file():
            return run_dir / name
    raise CheckpointError(f'{run_dir}: a folder without {RUN_MODEL} (or {OLD_RUN_MODEL}); pass a run folder or a file')


def write_model_file(payload: dict, path: Union[str, Path], what: str = 'model file') -> Path:
    """`payload`: {'state_dict': tensors, other JSON-able keys}. Safetensors unless `path` names a pickle format."""
    path = Path(path)
    if path.suffix in PICKLE_SUFFIXES:
        return save_atomically(payload, path, what)
    from safetensors.torch import save

    tensors = _contiguous(payload['state_dict'])
    description = {k: v for k, v in payload.items() if k != 'state_dict'}
    # 'format': 'pt' is what the Hugging Face loaders expect of a PyTorch safetensors file
    metadata = {'format': 'pt', META_KEY: json.dumps(description, sort_keys=True)}
    data = save(tensors, metadata=metadata)
    return write_atomically(path, lambda f: f.write(data), what)


def _contiguous(state: dict) -> dict:
    """safetensors refuses views and tensors that share memory (tied or sliced weights): each gets its own copy."""
    seen, out = set(), {}
    for name, t in state.items():
        t = t.detach().cpu()
        key = (t.untyped_storage().data_ptr(), t.storage_offset()) if t.numel() else None
        out[name] = t.clone() if key in seen or not t.is_contiguous() else t
        seen.add(key)
    return out


def read_model_file(path: Union[str, Path]) -> dict:
    """{'state_dict': tensors, **description} of a safetensors file, ours or anyone's (timm's, the Hub's: no
    description, tensors only)."""
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    try:
        with safe_open(str(path), framework='pt', device='cpu') as f:
            metadata = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f'{path}: cannot be read as a safetensors file ({e})') from None
    try:
        description = json.loads(metadata.get(META_KEY, '{}'))
    except json.JSONDecodeError as e:
        raise CheckpointError(f'{path}: its {META_KEY!r} metadata is not JSON ({e})') from None
    if not isinstance(description, dict):
        raise CheckpointError(f'{path}: its {META_KEY!r} metadata is not a JSON object')
    return {**description, 'state_dict': tensors}
