"""Momentum update of the target network: `FlatEMA(target_tensors, online_tensors).update(m)`.

Under DeepSpeed's ZeRO-1/2 optimizers `MasterEMA` reads the fp32 master weights instead: one
launch per parameter group, and one all-gather per group with several ranks; under ZeRO-3 `Zero3MasterEMA` does the
same from the master partitions into the whole targets.
One Triton launch over flat buffers on CUDA or under TRITON_INTERPRET=1, else a flat torch lerp.
Switch: CMAE_FUSED_EMA=0 (or CMAE_FUSED=0) forces the torch path.
"""

from .flat import FlatEMA
from .master import MasterEMA, master_groups
from .reference import ema_flat_reference, ema_list_reference
from .zero3 import Zero3MasterEMA, zero3_groups

__all__ = [
    'FlatEMA',
    'MasterEMA',
    'Zero3MasterEMA',
    'master_groups',
    'zero3_groups',
    'ema_flat_reference',
    'ema_list_reference',
]
