"""Where this process sits in the run, decided from its environment before any process group exists: rank, world
size, local rank and device, and the variables torch.distributed and DeepSpeed read set to agree with them.

DeepSpeed takes the device from LOCAL_RANK twice, in `init_distributed` (device_id=cuda:$LOCAL_RANK,
deepspeed/comm/torch.py) and in the engine (`set_device(local_rank)`, deepspeed/runtime/engine.py): where a task sees
one GPU only (`srun --gpus-per-task=1`, a site's GPU binding: Slurm sets CUDA_VISIBLE_DEVICES per task,
src/plugins/gres/common/gres_common.c), that GPU is cuda:0 and LOCAL_RANK must say 0 before either runs, whatever
the task's SLURM_LOCALID.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping, Optional

from ..config import ConfigError
from . import slurm

GROUP_KEYS = ('RANK', 'WORLD_SIZE', 'LOCAL_RANK', 'MASTER_ADDR', 'MASTER_PORT')


@dataclass(frozen=True)
class Placement:
    launcher: str
    """'launcher' (torchrun, deepspeed: RANK and WORLD_SIZE given), 'srun', 'sbatch' (the batch step: one process),
    'python' (one process)."""
    rank: int
    world_size: int
    local_rank: int
    """The index of this process's device among those it sees (the CPU: the node-local rank)."""
    device: Optional[int]
    """The CUDA device index, None on the CPU."""
    env: dict = field(default_factory=dict)
    """Variables to set before the process group is made; a one-process run picks its own MASTER_PORT."""

    @property
    def own_group(self) -> bool:
        return self.launcher in ('python', 'sbatch')


def decide(env: Mapping[str, str], gpus: Optional[int]) -> Placement:
    """`env`: the process's environment; `gpus`: the CUDA devices it sees (None on the CPU). A case it cannot serve
    raises ConfigError saying what to set."""
    if 'RANK' in env or 'WORLD_SIZE' in env:
        launcher, rank, world, local, out = 'launcher', *_given(env), {}
    elif slurm.in_step(env):
        out = slurm.slurm_env(env)
        launcher, rank, world, local = 'srun', int(out['RANK']), int(out['WORLD_SIZE']), int(out['LOCAL_RANK'])
    else:
        launcher = 'sbatch' if slurm.in_batch_step(env) else 'python'
        rank, world, local = 0, 1, 0
        out = {'RANK': '0', 'WORLD_SIZE': '1', 'LOCAL_RANK': '0', 'MASTER_ADDR': '127.0.0.1'}
    if launcher == 'launcher':
        _enough_gpus(env, gpus)
    device = _device(local, gpus, env)
    if device is not None and device != local:
        out['LOCAL_RANK'] = str(device)
        local = device
    elif local < 0:  # the CPU: DeepSpeed reads LOCAL_RANK, and looks for MPI where it is missing
        out['LOCAL_RANK'], local = '0', 0
    return Placement(launcher, rank, world, local, device, out)


def _given(env: Mapping[str, str]) -> tuple[int, int, int]:
    missing = [k for k in ('RANK', 'WORLD_SIZE', 'MASTER_ADDR', 'MASTER_PORT') if k not in env]
    if missing:
        given = ', '.join(f'{k}={env[k]}' for k in ('RANK', 'WORLD_SIZE') if k in env)
        raise ConfigError(
            f'{given} is set but {", ".join(missing)} is not: set all of RANK, WORLD_SIZE, MASTER_ADDR and '
            'MASTER_PORT (a launcher does), or none for one process'
        )
    rank, world = _int(env, 'RANK'), _int(env, 'WORLD_SIZE')
    if not 0 <= rank < world:
        raise ConfigError(f'RANK={rank} is outside WORLD_SIZE={world}')
    return rank, world, _int(env, 'LOCAL_RANK') if 'LOCAL_RANK' in env else -1


def _int(env: Mapping[str, str], key: str) -> int:
    try:
        return int(env[key])
    except ValueError:
        raise ConfigError(f'{key}={env[key]!r} is not an integer') from None


def _enough_gpus(env: Mapping[str, str], gpus: Optional[int]) -> None:
    """A launcher's ranks of one node all see the same devices: more ranks than GPUs would share one."""
    key = 'LOCAL_WORLD_SIZE' if 'LOCAL_WORLD_SIZE' in env else 'LOCAL_SIZE'  # torchrun's, deepspeed's
    if gpus and key in env and _int(env, key) > gpus:
        raise ConfigError(
            f'{key}={env[key]} ranks on this node but {gpus} GPU(s) visible (CUDA_VISIBLE_DEVICES='
            f'{env.get("CUDA_VISIBLE_DEVICES", "unset")}): start at most {gpus} per node (--nproc_per_node, --num_gpus)'
        )


def _device(local: int, gpus: Optional[int], env: Mapping[str, str]) -> Optional[int]:
    if not gpus:
        return None
    if gpus == 1:
        return 0  # the one this process sees, whichever physical GPU it is
    if local < 0:
        raise ConfigError(
            f'RANK and WORLD_SIZE are set but LOCAL_RANK is not, and this process sees {gpus} GPUs: set LOCAL_RANK '
            '(the rank on this node), or CUDA_VISIBLE_DEVICES to one GPU'
        )
    if local >= gpus:
        seen = env.get('CUDA_VISIBLE_DEVICES', 'unset')
        raise ConfigError(
            f'LOCAL_RANK {local} but this process sees {gpus} GPUs (CUDA_VISIBLE_DEVICES={seen}): start at most '
            f'{gpus} tasks per node, or one GPU per task (srun --gpus-per-task=1)'
        )
    return local
