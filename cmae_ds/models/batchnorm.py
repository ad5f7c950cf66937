"""BatchNorm for the projector and predictor: statistics over every rank's batch (SyncBatchNorm1d), computed in fp32
with fp32 running statistics whatever the model's dtype."""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from .collectives import all_reduce_sum, world


def keep_dtype(fn, t: torch.Tensor) -> torch.Tensor:
    """Apply a .to()/.cuda()/.half() conversion for its device only: `t` keeps its dtype."""
    moved = fn(t)
    return moved if moved.dtype == t.dtype else t.to(device=moved.device)


class SyncBatchNorm1d(nn.BatchNorm1d):
    """BatchNorm1d whose training statistics span the batch of every rank.

    torch.nn.SyncBatchNorm refuses CPU tensors, so this is built from autograd-aware all-reduces that work with
    gloo and NCCL alike. With one process it computes what nn.BatchNorm1d does. Two-pass (mean, then centred
    squares) so the result matches one rank on the joined batch to rounding.

    Computed in fp32 whatever the input and parameter dtypes (as BatchNorm runs under autocast in the official fp16
    recipe), with fp32 running statistics: a bf16/fp16 cast of the model moves them but keeps their dtype, and
    DeepSpeed's bf16 engine leaves buffers fp32 anyway, which plain nn.BatchNorm1d rejects next to bf16 weights.
    """

    def _apply(self, fn, recurse=True):
        stats = {k: t for k, t in self._buffers.items() if k in ('running_mean', 'running_var') and t is not None}
        super()._apply(fn, recurse)
        self._buffers.update({k: keep_dtype(fn, t) for k, t in stats.items()})
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _, size = world()
        if size == 1 or not self.training:
            return self._local(x)
        dtype = x.dtype
        x32 = x.float()
        count = x32.new_full((1,), x.shape[0])  # a fill on the device; new_tensor([...]) was a host-to-device copy
        sums = all_reduce_sum(torch.cat([x32.sum(dim=0), count]))
        total = sums[-1]
        mean = sums[:-1] / total
        var = all_reduce_sum(((x32 - mean) ** 2).sum(dim=0)) / total
        if self.track_running_stats:
            self._update_running(mean.detach(), var.detach() * total / (total - 1).clamp_min(1))
        y = (x32 - mean) * torch.rsqrt(var + self.eps)
        if self.affine:
            y = y * self.weight.float() + self.bias.float()
        return y.to(dtype)

    def _local(self, x: torch.Tensor) -> torch.Tensor:
        """nn.BatchNorm1d's forward on this rank's batch alone, in fp32."""
        m = 0.0 if self.momentum is None else self.momentum
        if self.training and self.track_running_stats:
            self.num_batches_tracked.add_(1)
            m = 1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum
        batch_stats = self.training or self.running_mean is None
        track = not self.training or self.track_running_stats
        w, b = (None, None) if self.weight is None else (self.weight.float(), self.bias.float())
        y = F.batch_norm(
            x.float(),
            self.running_mean if track else None,
            self.running_var if track else None,
            w,
            b,
            batch_stats,
            m,
            self.eps,
        )
        return y.to(x.dtype)

    @torch.no_grad()
    def _update_running(self, mean: torch.Tensor, unbiased_var: torch.Tensor) -> None:
        self.num_batches_tracked.add_(1)
        m = self.momentum if self.momentum is not None else 1.0 / float(self.num_batches_tracked)
        self.running_mean.lerp_(mean.to(self.running_mean.dtype), m)
        self.running_var.lerp_(unbiased_var.to(self.running_var.dtype), m)
