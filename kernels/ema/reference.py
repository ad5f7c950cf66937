"""Momentum (EMA) update, plain PyTorch: target = m * target + (1 - m) * online, in fp32 (docs/spec.md section 6).

Written as lerp(target, online, 1 - m): for weights below 0.5 torch computes target + w * (online - target),
which is what the Triton kernel computes too.
"""

from typing import Optional, Sequence

import torch


def ema_flat_reference(
    target_flat: torch.Tensor, online_flat: torch.Tensor, weight: float, shadow_flat: Optional[torch.Tensor] = None
) -> None:
    """In place on target_flat (fp32, (T,)); online_flat (T,) any float dtype; weight = 1 - m.

    shadow_flat, if given, is a low-precision copy of the target (the tensors the model reads) refreshed after.
    """
    target_flat.lerp_(online_flat.to(torch.float32), weight)
    if shadow_flat is not None:
        shadow_flat.copy_(target_flat)


def ema_list_reference(targets: Sequence[torch.Tensor], online: Sequence[torch.Tensor], weight: float) -> None:
    """In place on fp32 `targets`; `online` tensors of the same shapes, any float dtype (cast to fp32 first)."""
    torch._foreach_lerp_(list(targets), [o.detach().to(torch.float32) for o in online], weight)
