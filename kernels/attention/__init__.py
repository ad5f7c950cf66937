"""Attention dispatch: `attention(q, k, v)` over FlashAttention-3, flash-attn 2, torch SDPA or plain math.

'auto' takes the first backend in BACKENDS that can run on the tensors' device, dtype and head dim (FA3 on Hopper
with fp16/bf16, then FA2 on sm80+, then SDPA; on the CPU in bf16/fp16, math, which measured faster there).
`kernels.attention_backend` (or `CMAE_ATTN_BACKEND`) = fa3|fa2|sdpa|math forces one and raises if it cannot run;
attention's fusion switched off forces 'math'. Each backend is logged once when first used; `attention_backend()`
says which one a call would take, `last_impl('attention')` which one ran.
"""

import functools
import logging
from typing import Optional

import torch

from .._switch import fused_enabled, record, settings
from .backends import BACKENDS
from .reference import attention_reference

__all__ = ['attention', 'attention_backend', 'attention_reference', 'BACKENDS']
log = logging.getLogger(__name__)
_logged = set()


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
    return _auto(device, dtype, head_dim)


@functools.lru_cache(maxsize=None)
def _auto(device: torch.device, dtype: torch.dtype, head_dim: int) -> str:
    # Cached: the checks query the device, and every transformer block calls this every step.
    if device.type == 'cpu' and dtype in (torch.bfloat16, torch.float16):
        # Measured (docs/kernels.md): on CPUs PyTorch's SDPA in bf16 is 1.3-2.1x slower than the math path,
        # forward + backward; in fp32 it is 1.5-2.4x faster.
        return 'math'
    return next(name for name, (_, unusable) in BACKENDS.items() if unusable(device, dtype, head_dim) is None)


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
    name = _select(q.device, q.dtype, q.shape[-1])
    if name not in _logged:
        _logged.add(name)
        log.info('attention backend: %s (device %s, dtype %s)', name, q.device, q.dtype)
    record('attention', name)
    return BACKENDS[name][0](q, k, v)
