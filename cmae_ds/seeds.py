"""Every random stream of a training run, derived from the one user seed (`train.seed` / `<task>.seed`) here.

Engine streams (this module):
- model weights: the seed itself, the same on every rank (the target branch is outside DeepSpeed's broadcast and
  must start identical everywhere by construction);
- masks: one generator per rank, saved in checkpoints;
- a rank that a checkpoint has no saved state for (a resume on more ranks), and every classification rank after
  a resume (DeepSpeed keeps only rank 0's client state): streams keyed by (seed, rank, step).
Data streams: every view decision is keyed by (seed, epoch, dataset index) (`cmae_ds.data.views.draws`, counter-based),
the order and the per-sample generators by (seed, epoch[, index]) (`cmae_ds.data.pipelines.sampling`), so they depend on
neither ranks nor workers nor resumes; the per-batch streams below (random erasing, DALI's own operators,
synthetic batches) are keyed by (seed, epoch, rank, batch).
"""

from __future__ import annotations

import random

import numpy as np
import torch


def model_seed(seed: int) -> int:
    return seed


def mask_seed(seed: int, rank: int) -> int:
    return seed * 1000 + rank + 1


def resumed_rank_seeds(seed: int, rank: int, step: int) -> tuple[int, int]:
    """(global torch seed, mask seed) of a rank that resumes without saved RNG states."""
    return seed * 1000 + rank + 7919 * step, mask_seed(seed, rank) + 7919 * step


def seed_classifier_rank(seed: int, rank: int, step: int) -> None:
    """Per-rank streams for drop path (torch) and Mixup (numpy, python) of a classification run at `step`."""
    key = (seed * 1_000_003 + rank) * 1_000_003 + step
    torch.manual_seed(key % 2**63)
    np.random.seed(key % 2**32)
    random.seed(key)


def erasing_seed(seed: int, epoch: int, rank: int, batch: int) -> int:
    """Random erasing of one batch of one rank (int hashes are not salted: stable across processes)."""
    return hash((seed, epoch, rank, batch, 0xE4A5E)) & (2**63 - 1)


def dali_pipeline_seed(seed: int, epoch: int, rank: int, start_batch: int) -> int:
    """DALI's own operators (fine-tuning RandAugment) in a pipeline that starts at `start_batch`."""
    return int(np.random.SeedSequence([seed, epoch, rank, start_batch, 0xDA11]).generate_state(1)[0] & 0x7FFFFFFF)


def synthetic_batch_seed(seed: int, epoch: int, rank: int, batch: int) -> int:
    return hash((seed, epoch, rank, batch)) & 0xFFFFFFFF
