"""The loader contract every pipeline implements (see build_pretrain_loader)."""

from __future__ import annotations

from typing import Iterator

import torch

from .sampling import ShardPlan


class EpochLoader:
    """Epoch/resume bookkeeping shared by the pipelines.

    Subclasses implement `_iterate(epoch, start_batch)` yielding batch dicts already on `self.device`.
    """

    name = 'base'

    def __init__(self, plan: ShardPlan, device: torch.device):
        self.plan = plan
        self.device = torch.device(device)
        self.epoch = 0
        self._start = 0

    def __len__(self) -> int:
        """Batches per epoch on this rank (a resumed epoch yields len - skipped)."""
        return self.plan.num_batches()

    def set_epoch(self, epoch: int) -> None:
        """Order and augmentations of the next iteration follow (seed, epoch); call before iterating."""
        self.epoch = int(epoch)
        self._start = 0

    def skip_batches(self, k: int) -> None:
        """The next iteration starts at batch k of the current epoch, in the uninterrupted run's order."""
        if not 0 <= k <= len(self):
            raise ValueError(f'skip_batches({k}): the epoch has {len(self)} batches')
        self._start = int(k)

    def __iter__(self) -> Iterator[dict]:
        start, self._start = self._start, 0
        yield from self._iterate(self.epoch, start)

    def _iterate(self, epoch: int, start_batch: int) -> Iterator[dict]:
        raise NotImplementedError

    def __repr__(self) -> str:
        return (
            f'{type(self).__name__}(name={self.name!r}, batches={len(self)}, batch_size={self.plan.batch_size}, '
            f'rank={self.plan.rank}/{self.plan.world_size}, device={self.device})'
        )
