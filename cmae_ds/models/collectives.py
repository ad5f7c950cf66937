"""The collectives the model needs, as functions that are the identity on a single process.

The model never sets up a process group; it only asks whether one with more than one rank exists.
"""
from __future__ import annotations

import warnings

import torch
import torch.distributed as dist
from torch import nn

warnings.filterwarnings('ignore', message='torch.distributed.nn.functional.all_reduce is deprecated')


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


def _all_reduce_sum(x: torch.Tensor) -> torch.Tensor:
    """Differentiable sum over ranks: the backward sums the gradients of every rank's use of the result."""
    from torch.distributed.nn.functional import all_reduce  # autograd-aware; the functional-collectives replacement is not on gloo CPU in every release
    return all_reduce(x, op=dist.ReduceOp.SUM)


class SyncBatchNorm1d(nn.BatchNorm1d):
    """BatchNorm1d whose training statistics span the batch of every rank.

    torch.nn.SyncBatchNorm refuses CPU tensors, so this is built from autograd-aware all-reduces that work with
    gloo and NCCL alike. With one process it is exactly nn.BatchNorm1d. Two-pass (mean, then centred squares) so the
    result matches one rank on the joined batch to rounding.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _, size = world()
        if size == 1 or not self.training:
            return super().forward(x)
        dtype = x.dtype
        x32 = x.float()
        count = x32.new_tensor([float(x.shape[0])])
        sums = _all_reduce_sum(torch.cat([x32.sum(dim=0), count]))
        total = sums[-1]
        mean = sums[:-1] / total
        var = _all_reduce_sum(((x32 - mean) ** 2).sum(dim=0)) / total
        if self.track_running_stats:
            self._update_running(mean.detach(), var.detach() * total / (total - 1).clamp_min(1))
        y = (x32 - mean) * torch.rsqrt(var + self.eps)
        if self.affine:
            y = y * self.weight.float() + self.bias.float()
        return y.to(dtype)

    @torch.no_grad()
    def _update_running(self, mean: torch.Tensor, unbiased_var: torch.Tensor) -> None:
        self.num_batches_tracked.add_(1)
        m = self.momentum if self.momentum is not None else 1.0 / float(self.num_batches_tracked)
        self.running_mean.lerp_(mean.to(self.running_mean.dtype), m)
        self.running_var.lerp_(unbiased_var.to(self.running_var.dtype), m)

