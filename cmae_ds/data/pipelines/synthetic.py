"""Random batches generated on the device: measures the model without any data cost. Deterministic per
(seed, epoch, rank, batch)."""

from __future__ import annotations

from typing import Iterator

import torch

from ...seeds import synthetic_batch_seed
from .base import EpochLoader
from .sampling import ShardPlan

SYNTHETIC_SIZE = 1_281_167  # ImageNet-1k train, so epoch-based schedules keep their real length
SYNTHETIC_CLASSES = 1000


class SyntheticLoader(EpochLoader):
    name = 'synthetic'

    def __init__(self, plan: ShardPlan, device, img_size: int, mode: str = 'pretrain'):
        super().__init__(plan, device)
        self.size, self.mode = img_size, mode

    def _iterate(self, epoch: int, start_batch: int) -> Iterator[dict]:
        n, s = self.plan.batch_size, self.size
        for b in range(start_batch, len(self)):
            gen = torch.Generator(self.device).manual_seed(
                synthetic_batch_seed(self.plan.seed, epoch, self.plan.rank, b)
            )
            out = {'img': torch.randn(n, 3, s, s, generator=gen, device=self.device)}
            if self.mode == 'pretrain':
                out['img_target'] = torch.randn(n, 3, s, s, generator=gen, device=self.device)
            else:
                out['label'] = torch.randint(0, SYNTHETIC_CLASSES, (n,), generator=gen, device=self.device)
                out['valid'] = torch.ones(n, dtype=torch.bool, device=self.device)
            out['index'] = torch.arange(b * n, (b + 1) * n, device=self.device)
            yield out
