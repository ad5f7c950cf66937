"""Read checkpoint files without executing what they pickle.

`torch.load(weights_only=True)` refuses the metadata that official (mmengine) checkpoints carry next to their
weights: message-hub objects, numpy scalars, config classes from packages this project does not install. The
fallback unpickler rebuilds tensors, containers and numpy values, and turns every other class into an inert
placeholder instead of importing and calling it, so a file can never run code on load.
"""
from __future__ import annotations

import pickle
import types
from pathlib import Path
from typing import Any

import torch

# Exactly what a state dict and ordinary metadata need; anything else becomes an _Opaque placeholder.
_ALLOWED = {
    'collections': {'OrderedDict', 'defaultdict'},
    'torch._utils': {'_rebuild_tensor_v2', '_rebuild_parameter', '_rebuild_parameter_with_state',
                     '_rebuild_qtensor', '_rebuild_device_tensor_from_numpy'},
    'torch': {'Size', 'device', 'dtype', 'float32', 'float16', 'bfloat16', 'float64', 'int64', 'int32', 'uint8',
              'bool', 'int8', 'int16', 'FloatStorage', 'HalfStorage', 'BFloat16Storage', 'DoubleStorage',
              'LongStorage', 'IntStorage', 'ByteStorage', 'BoolStorage', 'CharStorage', 'ShortStorage'},
    'torch.storage': {'UntypedStorage', 'TypedStorage', '_load_from_bytes'},
    'numpy': {'dtype', 'ndarray'},
    'numpy.core.multiarray': {'_reconstruct', 'scalar'},
    'numpy._core.multiarray': {'_reconstruct', 'scalar'},
    'numpy.dtypes': None,  # dtype classes only (checked below)
    'builtins': {'set', 'frozenset', 'slice', 'complex', 'bytearray', 'range'},
    '_codecs': {'encode'},  # protocol 2 stores bytes (numpy scalars) as encode(str, 'latin1')
}


class _Opaque:
    """Stands in for a class the file refers to but that is not loaded; keeps whatever state it was given."""

    def __init__(self, *args, **kwargs):
        self.args, self.kwargs = args, kwargs

    def __setstate__(self, state):
        self.state = state


class _Unpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        allowed = _ALLOWED.get(module, set())
        if allowed is None or name in allowed:
            obj = super().find_class(module, name)
            if allowed is None and not isinstance(obj, type):
                return type(name, (_Opaque,), {})
            return obj
        return type(name, (_Opaque,), {'__module__': f'opaque.{module}'})


_TOLERANT = types.ModuleType('cmae_ds_tolerant_pickle')
_TOLERANT.Unpickler = _Unpickler
_TOLERANT.load = pickle.load
_TOLERANT.__name__ = 'pickle'


def load_checkpoint_file(path: Path) -> Any:
    """torch.load on the CPU; weights-only first, the placeholder unpickler when metadata needs it."""
    try:
        return torch.load(path, map_location='cpu', weights_only=True)
    except pickle.UnpicklingError:
        return torch.load(path, map_location='cpu', weights_only=False, pickle_module=_TOLERANT)
