"""The attention backends and when each one can run. Each takes and returns (N, H, L, Dh)."""

import functools
import importlib

import torch
import torch.nn.functional as F

from .reference import attention_reference

_HALF = (torch.float16, torch.bfloat16)


@functools.lru_cache(maxsize=None)
def _module(name: str):
    try:
        return importlib.import_module(name)
    except Exception:  # a wheel built for another CUDA/torch raises more than ImportError
        return None


def _capability(device: torch.device):
    return torch.cuda.get_device_capability(device) if device.type == 'cuda' else None


def fa3_unusable(device: torch.device, dtype: torch.dtype, head_dim: int):
    """Why FlashAttention-3 cannot run here, or None when it can."""
    if _module('flash_attn_interface') is None:
        return 'flash_attn_interface (FlashAttention-3) is not importable'
    if _capability(device) is None or _capability(device)[0] != 9:
        return 'FlashAttention-3 needs a Hopper GPU (sm90)'
    if dtype not in _HALF:
        return f'FlashAttention-3 takes fp16/bf16, got {dtype}'
    if head_dim > 256:
        return f'FlashAttention-3 takes head dim <= 256, got {head_dim}'
    return None


def fa2_unusable(device: torch.device, dtype: torch.dtype, head_dim: int):
    """Why flash-attn 2 cannot run here, or None when it can."""
    if _module('flash_attn') is None:
        return 'flash_attn (flash-attn 2) is not importable'
    if _capability(device) is None or _capability(device)[0] < 8:
        return 'flash-attn 2 needs an Ampere or newer GPU (sm80+)'
    if dtype not in _HALF:
        return f'flash-attn 2 takes fp16/bf16, got {dtype}'
    if head_dim > 256:
        return f'flash-attn 2 takes head dim <= 256, got {head_dim}'
    return None


def _always(device, dtype, head_dim):
    return None


def run_fa3(q, k, v):
    # flash-attn takes (N, L, H, Dh); the transposes are views, and so is the one back.
    out = _module('flash_attn_interface').flash_attn_func(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), softmax_scale=q.shape[-1] ** -0.5, causal=False
    )
    out = out[0] if isinstance(out, tuple) else out  # older FA3 builds return (out, softmax_lse)
    return out.transpose(1, 2)


def run_fa2(q, k, v):
    out = _module('flash_attn').flash_attn_func(
        q.transpose(1, 2),
        k.transpose(1, 2),
        v.transpose(1, 2),
        dropout_p=0.0,
        softmax_scale=q.shape[-1] ** -0.5,
        causal=False,
    )
    return out.transpose(1, 2)


def run_sdpa(q, k, v):
    # SDPA picks flash, cuDNN or memory-efficient kernels itself on CUDA; on the CPU a fused C++ kernel.
    return F.scaled_dot_product_attention(q, k, v, scale=q.shape[-1] ** -0.5)


# In order of preference for 'auto'.
BACKENDS = {
    'fa3': (run_fa3, fa3_unusable),
    'fa2': (run_fa2, fa2_unusable),
    'sdpa': (run_sdpa, _always),
    'math': (attention_reference, _always),
}
