"""Process-group setup shared by every engine: the DeepSpeed launcher, torchrun, or a plain `python` process."""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass
from datetime import timedelta
from typing import Optional

import torch

from ..data.threads import size_torch_threads


@dataclass(frozen=True)
class DistContext:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


def setup_distributed(timeout_s: Optional[float] = None) -> DistContext:
    """Initialise torch.distributed through DeepSpeed (NCCL on GPUs, gloo on the CPU).

    A plain `python launch/x.py` gets a one-rank group on a free local port, so the same code path runs everywhere.
    `timeout_s`: how long a collective may wait for a peer before it fails (None: torch's default).
    """
    import deepspeed
    from deepspeed.accelerator import get_accelerator

    if 'RANK' not in os.environ:
        os.environ.update(
            RANK='0', LOCAL_RANK='0', WORLD_SIZE='1', MASTER_ADDR='127.0.0.1', MASTER_PORT=str(_free_port())
        )
    accel = get_accelerator()
    backend = accel.communication_backend_name()
    if not torch.distributed.is_initialized():
        kw = {} if timeout_s is None else {'timeout': timedelta(seconds=timeout_s)}
        deepspeed.init_distributed(dist_backend=backend, **kw)
    rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
    local_rank = int(os.environ.get('LOCAL_RANK', 0))
    if accel.device_name() == 'cuda':
        accel.set_device(local_rank)
        device = torch.device('cuda', local_rank)
    else:
        device = torch.device('cpu')
    size_torch_threads(device)  # intra-op threads sized to this rank's cores (cmae_ds/data/threads.py)
    return DistContext(rank, world, local_rank, device)


def barrier() -> None:
    if torch.distributed.is_initialized():
        torch.distributed.barrier()


def is_main_process() -> bool:
    """Rank 0, or a process without a process group: where launch scripts print their summary."""
    return not torch.distributed.is_initialized() or torch.distributed.get_rank() == 0


def rank_world() -> tuple[int, int]:
    """(rank, world size), (0, 1) without a process group."""
    if torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def gather_objects(obj) -> list:
    """Every rank's `obj` (picklable), in rank order, on every rank. Collective."""
    _, world = rank_world()
    if world == 1:
        return [obj]
    out = [None] * world
    torch.distributed.all_gather_object(out, obj)
    return out
