"""Projector and predictor MLPs of the contrastive branch (docs/spec.md section 5)."""

from __future__ import annotations

import torch
from torch import nn

from .batchnorm import SyncBatchNorm1d


class ProjectionMLP(nn.Module):
    """Linear(in, hidden) -> BatchNorm (synchronized across ranks, eps 1e-6) -> ReLU -> Linear(hidden, out, no bias).

    Names fc0 / bn0 / fc1 are the official ones, so checkpoints map one to one.
    """

    def __init__(self, in_dim: int, hidden_dim: int, out_dim: int):
        super().__init__()
        self.fc0 = nn.Linear(in_dim, hidden_dim)
        self.bn0 = SyncBatchNorm1d(hidden_dim, eps=1e-6)
        self.fc1 = nn.Linear(hidden_dim, out_dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(N, in) -> (N, out)."""
        return self.fc1(torch.relu(self.bn0(self.fc0(x))))
