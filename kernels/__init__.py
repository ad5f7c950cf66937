"""Fused kernels of cmae_ds (installed as `cmae_ds.kernels`).

One folder per op: `reference.py` is the plain PyTorch specification, the fused version sits beside it, and the
op's entry point picks. `configure(...)` sets the switches once per process (engines pass the `kernels` config
section; `CMAE_FUSED=0`, `CMAE_FUSED_<OP>=0` and `CMAE_ATTN_BACKEND` override it); `last_impl(op)` says what
ran; `resolve(device, head_dims)` makes every per-call choice ahead of `torch.compile`. Triton is imported only
when a Triton kernel is first used, so importing this package needs torch alone.
"""

from ._resolve import resolve
from ._switch import configure, configured, fused_enabled, last_impl, record, settings
from .attention import attention, attention_backend
from .ema import FlatEMA
from .optim import build_adamw
from .recon_loss import recon_loss
from .visible_embed import gather_visible

__all__ = [
    'attention',
    'attention_backend',
    'build_adamw',
    'recon_loss',
    'resolve',
    'FlatEMA',
    'gather_visible',
    'configure',
    'configured',
    'fused_enabled',
    'last_impl',
    'record',
    'settings',
]
