"""Process-group setup shared by every engine: the DeepSpeed launcher, torchrun, or a plain `python` process."""
from __future__ import annotations

import os
import socket
from dataclasses import dataclass

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


def setup_distributed() -> DistContext:
    """Initialise torch.distributed through DeepSpeed (NCCL on GPUs, gloo on the CPU).

    A plain `python launch/x.py` gets a one-rank group on a free local port, so the same code path runs everywhere.
    """
    import deepspeed
    from deepspeed.accelerator import get_accelerator

    if 'RANK' not in os.environ:
        os.environ.update(RANK='0', LOCAL_RANK='0', WORLD_SIZE='1', MASTER_ADDR='127.0.0.1',
                          MASTER_PORT=str(_free_port()))
    accel = get_accelerator()
    backend = accel.communication_backend_name()
    if not torch.distributed.is_initialized():
        deepspeed.init_distributed(dist_backend=backend)
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
