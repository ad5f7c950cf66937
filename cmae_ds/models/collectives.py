"""The collectives the model needs, as functions that are the identity on a single process.

The model never sets up a process group; it only asks whether one with more than one rank exists.
"""

from __future__ import annotations

import warnings

import torch
import torch.distributed as dist


def world() -> tuple[int, int]:
    """(rank, world size) of the default process group, (0, 1) without one."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def gather_no_grad(x: torch.Tensor) -> torch.Tensor:
    """Concatenate `x` (N, ...) from every rank in rank order: (world*N, ...). Target-branch tensors only (no grad)."""
    _, size = world()
    if size == 1:
        return x
    parts = [torch.empty_like(x) for _ in range(size)]
    dist.all_gather(parts, x.detach().contiguous())
    return torch.cat(parts, dim=0)


def all_reduce_sum(x: torch.Tensor) -> torch.Tensor:
    """Differentiable sum over ranks: the backward sums the gradients of every rank's use of the result."""
    # Autograd-aware; its functional-collectives replacement does not run on gloo CPU in every release, hence the
    # deprecation warning silenced here (and only here).
    from torch.distributed.nn.functional import all_reduce

    with warnings.catch_warnings():
        warnings.filterwarnings('ignore', message='torch.distributed.nn.functional.all_reduce is deprecated')
        return all_reduce(x, op=dist.ReduceOp.SUM)
