"""Attention dispatch: `attention(q, k, v)` over FlashAttention-3, flash-attn 2, torch SDPA or plain math.

'auto' takes the first backend in BACKENDS that can run on the tensors' device, dtype and head dim (FA3 on Hopper
with fp16/bf16, then FA2 on sm80+, then SDPA; on the CPU in bf16/fp16, math, which measured faster there).
`kernels.attention_backend` (or `CMAE_ATTN_BACKEND`) = fa3|fa2|sdpa|math forces one and raises if it cannot run;
attention's fusion switched off forces 'math'. Each backend is logged once when first chosen;
`attention_backend()` says which one a call would take, `last_impl('attention')` which one ran.

The choice is made once per (device type, dtype, head dim) and kept in a plain table that `kernels.configure`
empties; `resolve_attention(device)` fills it ahead of `torch.compile`, so that a compiled forward only reads a dict
entry (no imports, device queries or logging inside the graph: those break it).
"""

import logging
from typing import Callable, Optional

import torch

from .._switch import fused_enabled, on_configure, record, settings
from .backends import BACKENDS
from .reference import attention_reference

__all__ = ['attention', 'attention_backend', 'attention_reference', 'resolve_attention', 'BACKENDS']
log = logging.getLogger(__name__)
_logged = set()
_HALF = (torch.bfloat16, torch.float16)
_table: dict = {}  # (device type, dtype, head dim) -> (backend name, function)
on_configure(_table.clear)


def _select(device: torch.device, dtype: torch.dtype, head_dim: int) -> str:
    forced = settings().attention_backend
    if forced != 'auto':
        if forced not in BACKENDS:
            raise ValueError(
                f'attention backend {forced!r} (kernels.attention_backend or CMAE_ATTN_BACKEND): '
                f'expected one of auto, {", ".join(BACKENDS)}'
            )
        why = BACKENDS[forced][1](device, dtype, head_dim)
        if why is not None:
            raise RuntimeError(f'attention backend {forced} cannot run: {why}')
        return forced
    if not fused_enabled('attention'):
        return 'math'
    if device.type == 'cpu' and dtype in _HALF:
        # Measured (docs/kernels.md): on CPUs PyTorch's SDPA in bf16 is 1.3-2.1x slower than the math path,
        # forward + backward; in fp32 it is 1.5-2.4x faster.
        return 'math'
    return next(name for name, (_, unusable) in BACKENDS.items() if unusable(device, dtype, head_dim) is None)


def _raiser(error: Exception) -> Callable:
    def run(q, k, v):
        raise error

    return run


def _choice(device: torch.device, dtype: torch.dtype, head_dim: int) -> tuple:
    key = (device.type, dtype, head_dim)
    if key not in _table:
        try:
            name = _select(device, dtype, head_dim)
            _table[key] = (name, BACKENDS[name][0])
        except (ValueError, RuntimeError) as e:  # raised when a call needs it, as an uncompiled dispatch would
            _table[key] = (None, _raiser(e))
            return _table[key]
        if name not in _logged:
            _logged.add(name)
            log.info('attention backend: %s (device %s, dtype %s)', name, device, dtype)
    return _table[key]


def resolve_attention(device, head_dims) -> None:
    """Choose the backend for every dtype a step can run attention in on `device`, before compiling."""
    device = torch.device(device)
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        for head_dim in head_dims:
            _choice(device, dtype, head_dim)


def attention_backend(device=None, dtype: Optional[torch.dtype] = None, head_dim: int = 64) -> str:
    """Name of the backend `attention` would use for tensors of this device and dtype.

    Defaults: the current CUDA device in bf16 when there is one, else the CPU in fp32.
    """
    if device is None:
        device = torch.device('cuda', torch.cuda.current_device()) if torch.cuda.is_available() else 'cpu'
    device = torch.device(device)
    if dtype is None:
        dtype = torch.bfloat16 if device.type == 'cuda' else torch.float32
    return _select(device, dtype, head_dim)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """softmax(q k^T / sqrt(Dh)) v for q, k, v (N, H, L, Dh) -> (N, H, L, Dh). No mask, no dropout."""
    name, fn = _choice(q.device, q.dtype, q.shape[-1])
    record('attention', name)
    return fn(q, k, v)
