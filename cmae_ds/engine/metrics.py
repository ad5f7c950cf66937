"""What a training loop measures between log steps: device-side loss sums (read only at log steps, so no per-step
host sync), the non-finite guard, throughput and the data-wait fraction, and the optimizer's grad norm and loss
scale."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Iterable, Iterator, Optional

import torch

from ..errors import NonFiniteLoss
from .checkpoints import store


def grad_norm(engine) -> Optional[float]:
    norm = engine.get_global_grad_norm()
    return None if norm is None else float(norm)


def loss_scale(engine) -> Optional[float]:
    scale = getattr(engine.optimizer, 'cur_scale', None) or getattr(engine.optimizer, 'loss_scale', None)
    return float(scale) if isinstance(scale, (int, float, torch.Tensor)) else None


def due(step: int, every: int) -> bool:
    return every > 0 and step % every == 0


class Meter:
    """Throughput and data-wait fraction between log steps, host-side only."""

    def __init__(self):
        self.reset()

    def reset(self):
        self.start, self.wait, self.images = time.perf_counter(), 0.0, 0

    def values(self, world_size: int) -> dict:
        elapsed = max(time.perf_counter() - self.start, 1e-9)
        return {'images_per_s': self.images * world_size / elapsed, 'data_wait_fraction': self.wait / elapsed}


class StepMetrics:
    """Owns the answer to "log now?" and the values logged: mean losses since the last log step (a single batch
    of a small run is too noisy to show the trend), lr, epoch, grad norm, loss scale, images/s, data wait."""

    def __init__(self, device: torch.device, loss_keys: tuple, every: int, world_size: int, ckpt_dir: Path):
        self.loss_keys, self.every, self.world_size, self.ckpt_dir = loss_keys, every, world_size, ckpt_dir
        self.nonfinite = torch.zeros((), dtype=torch.bool, device=device)
        self.meter = Meter()
        self.sums: dict = {}
        self.count = 0
        self.first_loss: Optional[float] = None
        self.last_loss: Optional[float] = None

    def timed(self, batches: Iterable) -> Iterator:
        """The batches, with the time spent waiting for each counted as data wait."""
        it = iter(batches)
        while True:
            t0 = time.perf_counter()
            try:
                batch = next(it)
            except StopIteration:
                return
            self.meter.wait += time.perf_counter() - t0
            yield batch

    def accumulate(self, out: dict, images: int) -> None:
        self.nonfinite |= ~torch.isfinite(out['loss'].detach())
        for key in self.loss_keys:
            if key in out:
                value = out[key].detach().float()
                self.sums[key] = self.sums[key] + value if key in self.sums else value
        self.count += 1
        self.meter.images += images

    def discard(self) -> None:
        """Forget the sums and the non-finite flag since the last log step: a rollback undid those steps."""
        self.nonfinite.zero_()
        self.sums, self.count = {}, 0

    def due(self, step: int, final: bool) -> bool:
        return final or due(step, self.every)

    def check_finite(self, step: int) -> None:
        """Reads the device flag (a host sync): only at log, save and evaluation steps."""
        if bool(self.nonfinite):
            last = store.find_resume_tag(self.ckpt_dir)
            raise NonFiniteLoss(
                f'the loss became NaN or inf at or before step {step}; stopped without saving. '
                f'Last good checkpoint: {self.ckpt_dir / last if last else "none"}'
            )

    def collect(self, engine, extra: dict) -> dict:
        """The values of this log step; resets the sums and the meter."""
        values = {k: float(v) / max(self.count, 1) for k, v in self.sums.items()}
        values.update(extra)
        for name, read in (('grad_norm', grad_norm), ('loss_scale', loss_scale)):
            value = read(engine)
            if value is not None:
                values[name] = value
        values.update(self.meter.values(self.world_size))
        self.sums, self.count = {}, 0
        self.meter.reset()
        self.last_loss = values.get('loss')
        self.first_loss = self.last_loss if self.first_loss is None else self.first_loss
        return values
