"""Triton momentum update over flat buffers: one launch for every target tensor.

Reads the online values in their own dtype and upcasts in registers, so a bf16 online model costs 2 bytes per
weight to read; the fp32 target is read and written once, and an optional low-precision shadow written beside it.
"""

import torch
import triton
import triton.language as tl

from .._triton import is_interpreted


@triton.jit
def _ema_kernel(target_ptr, online_ptr, shadow_ptr, numel, weight, BLOCK: tl.constexpr, HAS_SHADOW: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < numel
    t = tl.load(target_ptr + offs, mask=ok)
    o = tl.load(online_ptr + offs, mask=ok).to(tl.float32)
    t = t + weight * (o - t)
    tl.store(target_ptr + offs, t, mask=ok)
    if HAS_SHADOW:
        tl.store(shadow_ptr + offs, t.to(shadow_ptr.dtype.element_ty), mask=ok)


KERNEL = _ema_kernel


def ema_flat_triton(target_flat: torch.Tensor, online_flat: torch.Tensor, weight: float, shadow_flat=None) -> None:
    """Same contract as `ema_flat_reference`: in place on target_flat (fp32, (T,)), weight = 1 - m."""
    numel = target_flat.numel()
    # The interpreter pays per program, so it gets one big block; on the GPU 4K elements per program.
    block = 1 << 16 if is_interpreted(_ema_kernel) else 4096
    shadow = shadow_flat if shadow_flat is not None else target_flat
    _ema_kernel[(triton.cdiv(numel, block),)](
        target_flat,
        online_flat,
        shadow,
        numel,
        float(weight),
        BLOCK=block,
        HAS_SHADOW=shadow_flat is not None,
        num_warps=8,
    )
