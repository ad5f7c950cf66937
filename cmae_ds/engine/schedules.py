"""Learning-rate and momentum schedules as pure functions of the optimizer step (docs/spec.md sections 6 and 8).

Every function takes the step count (0-based, counted in optimizer steps, i.e. after gradient accumulation) and
returns a float; nothing here holds state, so resuming at step k gives exactly the value a straight run had.
"""

from __future__ import annotations

import math
from dataclasses import dataclass


def scaled_lr(base_lr: float, global_batch: int) -> float:
    """The linear scaling rule of the official recipe: `base_lr` is the rate per 256 images of global batch.

    1.5e-4 at a global batch of 4096 gives 2.4e-3 (docs/spec.md section 8).
    """
    if global_batch <= 0:
        raise ValueError(f'global_batch must be positive, got {global_batch}')
    return base_lr * global_batch / 256


def lr_at(
    step: int,
    *,
    base_lr: float,
    total_steps: int,
    warmup_steps: int,
    warmup_start_factor: float = 1e-4,
    min_lr: float = 0.0,
) -> float:
    """Learning rate at optimizer step `step`: linear warmup, then cosine decay (per iteration), as mmengine's
    LinearLR followed by CosineAnnealingLR, both with `convert_to_iter_based=True` (the official config).

    - `0 <= step < warmup_steps`: linear from `warmup_start_factor * base_lr` (at step 0) to `base_lr`, reached at
      step `warmup_steps - 1`: LinearLR sets `total_iters = end - begin - 1`
      (mmengine/optim/scheduler/param_scheduler.py, LinearParamScheduler).
    - `warmup_steps <= step <= total_steps`: half a cosine from the warmup's last value down to `min_lr`, so the
      peak is held for two steps (`warmup_steps - 1` and `warmup_steps`) as in mmengine.
    - `warmup_steps == 1`: LinearLR's `total_iters` is 0 and it never raises the rate, so step 0 is
      `warmup_start_factor * base_lr` and the chained cosine decays from that value, not from `base_lr` (mmengine's
      behaviour, kept so that a one-step warmup trains as the official code does).
    - `step >= total_steps`: `min_lr` (a run that goes past its planned length does not climb back up the cosine).
    - `warmup_steps == 0`: no warmup, the cosine starts at `base_lr` at step 0.
    - `warmup_steps >= total_steps`: warmup only; the rate holds at `base_lr` from `warmup_steps` on (there is no
      room left for a decay, and dropping to `min_lr` at the end of warmup would be a surprise).
    """
    _check_steps(step, total_steps, warmup_steps)
    start = warmup_start_factor * base_lr
    if step < warmup_steps:
        if warmup_steps == 1:
            return start
        return start + (base_lr - start) * (step / (warmup_steps - 1))
    peak = start if warmup_steps == 1 else base_lr
    decay_steps = total_steps - warmup_steps
    if decay_steps <= 0:
        return peak
    progress = min(1.0, (step - warmup_steps) / decay_steps)
    return min_lr + (peak - min_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))


def momentum_at(step: int, *, total_steps: int, m_base: float, m_end: float) -> float:
    """EMA momentum of the target branch after optimizer step `step` (docs/spec.md section 6).

    `m = m_end - (m_end - m_base) * (cos(pi * step / total_steps) + 1) / 2`: `m_base` at step 0, `m_end` at
    `total_steps` and beyond (clamped, so an over-long run keeps `m_end`). Official: m_base = m_end = 0.996.
    """
    _check_steps(step, total_steps, 0)
    progress = min(1.0, step / total_steps)
    return m_end - (m_end - m_base) * (math.cos(math.pi * progress) + 1.0) / 2.0


def _check_steps(step: int, total_steps: int, warmup_steps: int) -> None:
    if step < 0:
        raise ValueError(f'step must be >= 0, got {step}')
    if total_steps <= 0:
        raise ValueError(f'total_steps must be positive, got {total_steps}')
    if warmup_steps < 0:
        raise ValueError(f'warmup_steps must be >= 0, got {warmup_steps}')


@dataclass(frozen=True)
class Schedule:
    """The learning rate of a run as a pure function of the optimizer step, with the run's step arithmetic."""

    peak_lr: float
    total_steps: int
    warmup_steps: int
    steps_per_epoch: int
    warmup_start_factor: float
    min_lr: float

    def lr(self, step: int) -> float:
        return lr_at(
            step,
            base_lr=self.peak_lr,
            total_steps=self.total_steps,
            warmup_steps=self.warmup_steps,
            warmup_start_factor=self.warmup_start_factor,
            min_lr=self.min_lr,
        )


def make_schedule(opt, global_batch: int, grad_accum: int, batches_per_epoch: int, where: str) -> Schedule:
    """`opt`: a section with base_lr (per 256 images), epochs, warmup_epochs, warmup_start_factor and min_lr;
    `batches_per_epoch`: micro-batches per rank. `where` names the DeepSpeed JSON in the error."""
    steps_per_epoch = batches_per_epoch // grad_accum
    if steps_per_epoch == 0:
        from ..config import ConfigError

        raise ConfigError(
            f'{where}: {batches_per_epoch} micro-batches per rank per epoch are fewer than '
            f'gradient_accumulation_steps {grad_accum}: the dataset is too small for a '
            f'global batch of {global_batch}'
        )
    return Schedule(
        peak_lr=scaled_lr(opt.base_lr, global_batch),
        total_steps=opt.epochs * steps_per_epoch,
        warmup_steps=opt.warmup_epochs * steps_per_epoch,
        steps_per_epoch=steps_per_epoch,
        warmup_start_factor=opt.warmup_start_factor,
        min_lr=opt.min_lr,
    )
