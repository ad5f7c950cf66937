"""Input of the online encoder, plain PyTorch: visible patch embeddings plus their position embeddings."""

import torch


def gather_visible_reference(x: torch.Tensor, pos: torch.Tensor, ids_keep: torch.Tensor) -> torch.Tensor:
    """out[n, k] = x[n, ids_keep[n, k]] + pos[0, ids_keep[n, k]].

    x (N, L, D), pos (1, L, D), ids_keep (N, K) int64 -> (N, K, D) in the promoted dtype of x and pos.
    Autograd scatters the gradient into x (zeros at hidden patches) and sums it over the batch into pos.
    """
    d = x.shape[-1]
    idx = ids_keep.unsqueeze(-1).expand(-1, -1, d)  # (N, K, D)
    return torch.gather(x, 1, idx) + pos[0][ids_keep]
