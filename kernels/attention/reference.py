"""Multi-head attention, plain PyTorch: the specification. No mask, no dropout, scale Dh**-0.5."""

import torch


def attention_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """q, k, v (N, H, L, Dh) -> (N, H, L, Dh). Softmax in fp32 whatever the input dtype, output in q's dtype."""
    scale = q.shape[-1] ** -0.5
    scores = (q.float() * scale) @ k.float().transpose(-2, -1)  # (N, H, L, L)
    return (scores.softmax(dim=-1) @ v.float()).to(q.dtype)
