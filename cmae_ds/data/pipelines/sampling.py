"""Which dataset indices a rank reads in an epoch, in which order; shared by every pipeline.

The order is a pure function of (seed, epoch, rank, world_size), so a resumed run (skip_batches) and the DALI and
torch pipelines all see exactly the same images in the same batches.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class ShardPlan:
    """Sharding of `num_samples` indices over ranks, DistributedSampler-style (rank r takes order[r::world]).

    shuffle: permute by (seed, epoch) first. drop_last: drop the global tail so every rank has the same count and
    drop each rank's incomplete last batch. pad: (eval) repeat indices from the start so every rank has the same
    count; the repeated ones are flagged invalid.
    """

    num_samples: int
    batch_size: int
    rank: int = 0
    world_size: int = 1
    seed: int = 0
    shuffle: bool = True
    drop_last: bool = True
    pad: bool = False

    def __post_init__(self) -> None:
        if not 0 <= self.rank < self.world_size:
            raise ValueError(f'rank {self.rank} outside world_size {self.world_size}')
        if self.batch_size <= 0:
            raise ValueError(f'batch_size {self.batch_size} must be positive')
        if self.drop_last and self.pad:
            raise ValueError('ShardPlan: drop_last and pad exclude each other')

    def epoch_order(self, epoch: int) -> np.ndarray:
        """(N,) int64 global order of the epoch."""
        if not self.shuffle:
            return np.arange(self.num_samples, dtype=np.int64)
        rng = np.random.Generator(np.random.PCG64([self.seed, epoch, 0x5EED]))
        return rng.permutation(self.num_samples).astype(np.int64)

    def rank_indices(self, epoch: int) -> tuple[np.ndarray, np.ndarray]:
        """(indices, valid): this rank's dataset indices for the epoch before batching, (n,) int64 and (n,) bool."""
        order = self.epoch_order(epoch)
        valid = np.ones(len(order), dtype=bool)
        w = self.world_size
        if self.drop_last:
            order, valid = order[: len(order) // w * w], valid[: len(order) // w * w]
        elif self.pad and len(order) % w:
            extra = w - len(order) % w
            reps = np.resize(order, extra)  # DistributedSampler repeats from the start (cyclically if tiny)
            order = np.concatenate([order, reps])
            valid = np.concatenate([valid, np.zeros(extra, dtype=bool)])
        idx, val = order[self.rank :: w], valid[self.rank :: w]
        if self.drop_last:
            n = len(idx) // self.batch_size * self.batch_size
            idx, val = idx[:n], val[:n]
        return idx, val

    def num_samples_on_rank(self) -> int:
        """len(rank_indices(e)[0]) for any epoch, without drawing the permutation."""
        n, w, r = self.num_samples, self.world_size, self.rank
        if self.drop_last:
            return n // w // self.batch_size * self.batch_size
        if self.pad:
            return -(-n // w)
        return (n - r + w - 1) // w

    def num_batches(self) -> int:
        return -(-self.num_samples_on_rank() // self.batch_size)

    def batches(self, epoch: int, start_batch: int = 0) -> list[tuple[np.ndarray, np.ndarray]]:
        """[(indices (b,), valid (b,))] for batches start_batch.. of the epoch."""
        idx, val = self.rank_indices(epoch)
        b = self.batch_size
        return [(idx[i : i + b], val[i : i + b]) for i in range(start_batch * b, len(idx), b)]


def sample_rng(seed: int, epoch: int, index: int, stream: int = 0) -> np.random.Generator:
    """Per-sample generator keyed by (seed, epoch, index): augmentations do not depend on workers or resume."""
    return np.random.Generator(np.random.PCG64([seed, epoch, index, stream]))
