"""Momentum update of the target network: `FlatEMA(target_tensors, online_tensors).update(m)`.

One Triton launch over flat buffers on CUDA or under TRITON_INTERPRET=1, else a flat torch lerp.
Switch: CMAE_FUSED_EMA=0 (or CMAE_FUSED=0) forces the torch path.
"""

from .flat import FlatEMA
from .reference import ema_flat_reference, ema_list_reference

__all__ = ['FlatEMA', 'ema_flat_reference', 'ema_list_reference']
