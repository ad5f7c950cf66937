"""Thread and worker counts sized to the cores this rank owns.

On a machine shared with other work, an OpenMP parallel region waits for its slowest thread: when another process
holds one of the cores, every torch op of the model waits a scheduler time slice (~10 ms) for the thread that was
pushed off, and when the data threads (DALI's, DataLoader workers) come on top of torch's intra-op threads the
rank competes with itself. Measured on the 2-core sandbox under load: an in-place round of a (64, 3, 40, 40) tensor
took 12 ms with 2 threads and 0.07 ms with 1 (docs/data.md, "Threads"). So the defaults give each rank
threads + data threads <= its cores.
"""

from __future__ import annotations

import logging
import os

import torch

log = logging.getLogger(__name__)


def cores_per_rank() -> int:
    """The CPUs this process may run on (sched_getaffinity: cgroup/taskset aware) divided among the ranks of this
    node (LOCAL_WORLD_SIZE from torchrun, LOCAL_SIZE from the DeepSpeed launcher)."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cpus = os.cpu_count() or 1
    local = int(os.environ.get('LOCAL_WORLD_SIZE') or os.environ.get('LOCAL_SIZE') or 1)
    return max(1, cpus // max(1, local))


def default_data_workers(device, cores: int) -> int:
    """On a GPU the model needs one core to drive it and the data gets the rest; on a CPU the model's threads do
    the heavy work and the data a quarter of the cores (at least one)."""
    if torch.device(device).type == 'cuda':
        return max(1, cores - 1)
    return max(1, cores // 4)


def data_workers(num_workers: int, device) -> int:
    """data.num_workers when set (>= 0), else (-1) the default for this rank's cores."""
    if num_workers >= 0:
        return num_workers
    return default_data_workers(device, cores_per_rank())


def torch_threads(device, cores: int) -> int:
    """Intra-op threads: all of the rank's cores on a GPU (its CPU ops are occasional: offloaded optimizer, host
    copies); on a CPU what the data workers leave."""
    if torch.device(device).type == 'cuda':
        return cores
    return max(1, cores - default_data_workers(device, cores))


def size_torch_threads(device) -> int:
    """torch.set_num_threads for this rank unless OMP_NUM_THREADS says otherwise (an explicit setting, or the
    DeepSpeed launcher's --bind_cores_to_rank). Returns the count in effect."""
    if os.environ.get('OMP_NUM_THREADS'):
        return torch.get_num_threads()
    n = torch_threads(device, cores_per_rank())
    torch.set_num_threads(n)
    log.info('torch intra-op threads: %d (cores per rank %d)', n, cores_per_rank())
    return n
