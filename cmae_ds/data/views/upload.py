"""Host values onto the device without a host wait.

A plain `.to(cuda)`, `torch.tensor(..., device=cuda)` or `as_tensor(array, device=cuda)` is a blocking copy: with
non_blocking=False torch's CUDA copy calls memcpy_and_sync (torch/include/c10/cuda/CUDAFunctions.h: cudaMemcpyAsync,
then cudaStreamSynchronize), so the host waits for every kernel queued before it. Per-batch host values (index
lists, factors, labels) go through `upload`: on CUDA from pinned memory with non_blocking=True (torch's caching host
allocator keeps the pinned block until the copy has run); small constants are built once per device by `constant`.
"""

from __future__ import annotations

import numpy as np
import torch

_CONSTANTS: dict = {}


def upload(values, device: torch.device, dtype: torch.dtype | None = None) -> torch.Tensor:
    """A host array or tensor -> a tensor on `device`, queued without a host wait (a tensor already there is
    returned as it is)."""
    t = torch.from_numpy(np.ascontiguousarray(values)) if isinstance(values, np.ndarray) else torch.as_tensor(values)
    if dtype is not None and t.dtype != dtype:
        t = t.to(dtype)
    if device.type == 'cuda' and t.device.type == 'cpu':
        t = t.pin_memory()
    return t.to(device, non_blocking=True)


def constant(values: tuple, device: torch.device, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """A small constant tensor on `device`, built once per (values, device, dtype). The one build is a blocking
    copy on purpose: the tensor is then used on any stream, and a queued copy would be a race there."""
    key = (values, str(device), dtype)
    if key not in _CONSTANTS:
        _CONSTANTS[key] = torch.tensor(values, dtype=dtype).to(device)
    return _CONSTANTS[key]
