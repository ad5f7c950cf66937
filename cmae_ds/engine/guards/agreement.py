"""What each optimizer step sends to the host: one step's loss, non-finite flag and gradient norm, copied off the
device without waiting, and judged one step later together with the stop flag in one CPU all-reduce.

By the time step N+1's kernels are queued, step N's values have long been computed: waiting for them (an event on
CUDA, nothing on the CPU) does not wait for the step in flight, so the one read of the step is off its critical path.
"""

from __future__ import annotations

from typing import Optional

import torch

WIDTH = 3  # loss, non-finite flag, gradient norm


class StepValues:
    """One optimizer step's values on their way to the host: `host()` is a (WIDTH,) float64 CPU tensor."""

    def __init__(self, step: int, loss_sum: torch.Tensor, count: int, norm, overflow: bool, at: tuple):
        self.step, self.overflow, self.at = step, overflow, at
        loss = (loss_sum / count).reshape(1)
        # A norm DeepSpeed already holds as a Python number (inf after an overflow, None when it computes none)
        # stays on the host; a tensor norm travels with the loss.
        self._device_norm = torch.is_tensor(norm)
        self.host_norm: Optional[float] = None if self._device_norm else norm
        norm_part = norm.detach().reshape(1).to(loss) if torch.is_tensor(norm) else torch.zeros_like(loss)
        values = torch.cat([loss, (~torch.isfinite(loss)).to(loss.dtype), norm_part])
        self._ready = None
        if values.is_cuda:
            self._values = torch.empty(WIDTH, dtype=values.dtype, pin_memory=True)
            self._values.copy_(values, non_blocking=True)
            self._ready = torch.cuda.Event()
            self._ready.record()
        else:
            self._values = values

    def host(self) -> torch.Tensor:
        if self._ready is not None:
            self._ready.synchronize()  # this step's values only: queued before the next step's kernels
        return self._values.to(torch.float64)

    def norm(self, reduced: float, world_size: int) -> Optional[float]:
        """The step's gradient norm (the same on every rank: DeepSpeed's norm is global) from the reduced sum."""
        return reduced / world_size if self._device_norm else self.host_norm


def agree(judged: list, stop, world_size: int) -> list:
    """One all-reduce (on the stop requests' CPU group) of the judged steps' values and the stop flag; the stop's
    verdict goes to `stop`. Returns (this rank's values, the reduced sums) per judged step; nothing is read when
    there is nothing to agree on (one rank, no step to judge)."""
    if world_size == 1 and not judged:
        stop.decide(stop.reason is not None)
        return []
    flag = torch.tensor([1.0 if stop.reason is not None else 0.0], dtype=torch.float64)
    local = torch.cat([*(s.host() for s in judged), flag])
    reduced = local
    if world_size > 1:
        reduced = local.clone()
        torch.distributed.all_reduce(reduced, group=stop.group)
    values = reduced.tolist()  # the one host read of the step
    stop.decide(values[-1] > 0)
    return [(local[i * WIDTH : (i + 1) * WIDTH], values[i * WIDTH : (i + 1) * WIDTH]) for i in range(len(judged))]
