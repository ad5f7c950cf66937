"""Online encoder input: `gather_visible(x, pos, ids_keep) -> (N, K, D)`.

Triton gather/scatter (`fused.py`) on CUDA tensors or under TRITON_INTERPRET=1, else the reference.
Switch: CMAE_FUSED_VISIBLE_EMBED=0 (or CMAE_FUSED=0) forces the reference.
"""

import torch

from .._switch import record
from .._triton import load_fused
from .reference import gather_visible_reference

__all__ = ['gather_visible', 'gather_visible_reference']


def gather_visible(x: torch.Tensor, pos: torch.Tensor, ids_keep: torch.Tensor) -> torch.Tensor:
    """out[n, k] = x[n, ids_keep[n, k]] + pos[0, ids_keep[n, k]].

    x (N, L, D), pos (1, L, D) (may require grad), ids_keep (N, K) int64 with distinct indices per row.
    Returns (N, K, D) in the promoted dtype of x and pos; gradients flow to x (zeros at hidden patches) and pos.
    """
    if pos.dim() != 3 or pos.shape[0] != 1 or pos.shape[1:] != x.shape[1:]:
        raise ValueError(f'pos must be (1, L, D) matching x {tuple(x.shape)}, got {tuple(pos.shape)}')
    fused = load_fused('visible_embed', __name__, x, pos, ids_keep)
    if fused is not None:
        record('visible_embed', 'triton')
        return fused.gather_visible_triton(x, pos, ids_keep)
    record('visible_embed', 'reference')
    return gather_visible_reference(x, pos, ids_keep)
