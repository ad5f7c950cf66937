"""Process-group setup shared by every engine: the DeepSpeed launcher, torchrun, or a plain `python` process."""

from __future__ import annotations

import atexit
import contextlib
import gc
import os
import signal
import socket
import sys
import threading
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Optional

import torch

from ..config import ConfigError
from ..data.pipelines.threads import size_torch_threads
from . import startup
from .placement import GROUP_KEYS, Placement, decide

# The signals that ask a run to stop (guards/preemption.py installs their handlers; the teardown holds them).
SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)


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


_own_env = False  # whether this process made up its own one-rank environment


def setup_distributed(timeout_s: Optional[float] = None) -> DistContext:
    """Initialise torch.distributed through DeepSpeed (NCCL on GPUs, gloo on the CPU).

    Rank, world size, local rank and device are decided from the environment before the group exists
    (cmae_ds/engine/placement.py): a launcher's RANK/WORLD_SIZE, a task of an srun step (cmae_ds/engine/slurm.py),
    or one process (`python launch/x.py`, also in an sbatch script's batch step) on a free local port.
    `timeout_s`: how long a collective may wait for a peer before it fails (None: torch's default).
    A stop signal while the group forms ends the process at once (cmae_ds/engine/startup.py).
    """
    import deepspeed
    from deepspeed.accelerator import get_accelerator

    accel = get_accelerator()
    backend = accel.communication_backend_name()
    place = _place(accel)
    if not torch.distributed.is_initialized():
        began = startup.begin()  # a run's start_run has begun it already, and ends it at the first step
        try:
            kw = {} if timeout_s is None else {'timeout': timedelta(seconds=timeout_s)}
            _init_on_restart_store(backend, kw.get('timeout'))
            deepspeed.init_distributed(dist_backend=backend, **kw)
        finally:
            if began:  # a notebook's or a test's Ctrl-C after this is theirs again
                startup.end()
        atexit.unregister(_destroy_gloo_group)  # once per process, however often a group is set up
        atexit.register(_destroy_gloo_group)
        _unlink_shm_names()
    rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
    if place.device is not None:
        accel.set_device(place.device)
        device = torch.device('cuda', place.device)
    else:
        device = torch.device('cpu')
    size_torch_threads(device)  # intra-op threads sized to this rank's cores (cmae_ds/data/pipelines/threads.py)
    return DistContext(rank, world, place.local_rank, device)


def _place(accel) -> Placement:
    """Decide, and set RANK ... LOCAL_RANK as decided (DeepSpeed reads them from the environment)."""
    global _own_env
    env = dict(os.environ)
    if _own_env:  # written by an earlier group of this process: decided afresh, on a fresh port
        for key in GROUP_KEYS:
            env.pop(key, None)
    place = decide(env, accel.device_count() if accel.device_name() == 'cuda' else None)
    os.environ.update(place.env)
    if place.own_group:
        _own_env = True
        os.environ['MASTER_PORT'] = str(_free_port())
        tasks = os.environ.get('SLURM_NTASKS', '1')
        if place.launcher == 'sbatch' and tasks != '1':
            print(
                f'cmae_ds: the batch step of Slurm job {os.environ.get("SLURM_JOB_ID")}: one process; '
                f"`srun python ...` runs the job's {tasks} tasks",
                file=sys.stderr,
                flush=True,
            )
    return place


def _init_on_restart_store(backend: str, timeout: Optional[timedelta]) -> None:
    """Under torchrun the ranks meet in the agent's store, which outlives a restart (--max-restarts): the group's
    keys of the failed attempt were still there, the new ranks read their peers' old addresses and failed to
    connect (gloo: 'connectFullMesh failed ... Connection refused'; seen here on every restart, torch 2.14, static
    and c10d rendezvous). On one node each attempt meets under its own prefix instead. DeepSpeed takes the group
    as it is.

    Over several nodes no prefix can serve: TORCHELASTIC_RESTART_COUNT is each agent's own count, raised when its
    workers failed and not when it restarts them because another node waits (torch/distributed/elastic/agent/server/
    api.py, `_invoke_run`), so the nodes of one restart can wait under different prefixes until the timeout.
    Without the shared store (TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1, the agents' environment) rank 0 serves a new
    store on a new port at every rendezvous round (torch/distributed/elastic/rendezvous/dynamic_rendezvous.py) and no
    old key is left to read."""
    attempt = os.environ.get('TORCHELASTIC_RESTART_COUNT')
    if attempt is None or os.environ.get('TORCHELASTIC_USE_AGENT_STORE') != 'True':
        return
    nodes = int(os.environ.get('GROUP_WORLD_SIZE', '1'))
    restarts = int(os.environ.get('TORCHELASTIC_MAX_RESTARTS', '0'))
    if nodes > 1 and restarts > 0:
        raise ConfigError(
            f'torchrun over {nodes} nodes with --max-restarts {restarts} and the shared rendezvous store: the nodes '
            'of a restart cannot agree on it; export TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 on every node and use '
            '--rdzv-backend c10d'
        )
    rank, world = int(os.environ['RANK']), int(os.environ['WORLD_SIZE'])
    timeout = timeout or timedelta(minutes=30)
    agent = torch.distributed.TCPStore(
        os.environ['MASTER_ADDR'], int(os.environ['MASTER_PORT']), world, is_master=False, timeout=timeout
    )
    store = torch.distributed.PrefixStore(f'cmae_ds/attempt_{attempt}', agent)
    torch.distributed.init_process_group(backend, store=store, rank=rank, world_size=world, timeout=timeout)


SHM_DIR = Path('/dev/shm')


def _shm_segment(rank: int) -> Path:
    """DeepSpeed's CPU communication op: one segment per rank in /dev/shm, named after the master address, port and
    the rank (deepspeed/ops/csrc/cpu/comm/shm.cpp)."""
    addr, port = os.environ.get('MASTER_ADDR', ''), os.environ.get('MASTER_PORT', '')
    return SHM_DIR / f'deepspeed_allreduce_buffer_{os.getuid()}_{addr}_{port}_{rank}'


def _unlink_shm_names() -> None:
    """DeepSpeed never unlinks its shared-memory segments: every CPU run left 69 MB per rank in /dev/shm, which is
    RAM (seen here: 22 GB after a few hundred test runs, the machine swapping and runs timing out). Once every
    rank has mapped every segment (init_distributed waits for that), the names can go: the memory lives on while
    mapped and is freed when the last rank exits, however it exits."""
    if torch.distributed.get_backend() != 'gloo':  # the same answer on every rank: all or none wait here
        return
    torch.distributed.barrier()
    _shm_segment(torch.distributed.get_rank()).unlink(missing_ok=True)


def shutdown_distributed() -> None:
    """Release the engine and destroy the process groups while the interpreter is whole. Left to interpreter
    finalization, a gloo worker thread released the last collective's tensors after Python had started tearing
    down, could not take the GIL, and the rank died of SIGABRT after its work was done ('terminate called without
    an active exception'; pytorch/pytorch#190489): seen here in 4 of 19 pytest runs of tests/test_elastic.py.
    The collection first: DeepSpeed's engine sits in reference cycles, and its teardown belongs before the groups'.
    Under NCCL every rank must get here together (its teardown talks to the peers): call it where all do."""
    with _signals_held():
        gc.collect()
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
            _forget_deepspeed_groups()
        gc.collect()


def _forget_deepspeed_groups() -> None:
    """DeepSpeed keeps the world group it cloned (and the groups made from it) in module globals: after the groups
    are destroyed, the next engine of this process found them there and failed ('Group ... is not registered')."""
    groups = sys.modules.get('deepspeed.utils.groups')
    if groups is None:
        return
    for name in ('_WORLD_GROUP', '_DATA_PARALLEL_GROUP', '_ZERO_PARAM_INTRA_PARALLEL_GROUP', 'mesh_device'):
        setattr(groups, name, None)
    for name in ('_EXPERT_PARALLEL_GROUP', '_EXPERT_DATA_PARALLEL_GROUP', '_ALL_TO_ALL_GROUP'):
        getattr(groups, name).clear()


@contextlib.contextmanager
def _signals_held():
    """A late Ctrl-C or SIGTERM (the run's own handlers are gone by now) raised inside a Python callback of the C++
    teardown and ended in std::terminate (exit -6 instead of -2). Recorded here, then delivered once the
    teardown is over, so that it ends the process as it would have."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    caught = []
    previous = {s: signal.signal(s, lambda n, _: caught.append(n)) for s in SIGNALS}
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
        for n in caught:
            signal.raise_signal(n)


def _destroy_gloo_group() -> None:
    """At exit, whatever the path: gloo's teardown is local (NCCL's is left to shutdown_distributed's callers)."""
    if torch.distributed.is_initialized() and torch.distributed.get_backend() == 'gloo':
        shutdown_distributed()


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
