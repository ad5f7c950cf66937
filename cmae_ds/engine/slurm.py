"""A job step started by `srun` (one task per GPU) without a launcher: the rank, world size, local rank and the
master address and port that torch.distributed reads, derived from what Slurm sets in every task of a step.

Slurm's sources tell a step from the batch step (SchedMD/slurm, src/common/env.c): `env_array_for_step` gives a
step's tasks SLURM_STEP_NUM_TASKS, SLURM_STEP_NODELIST and SLURM_STEP_ID; `env_array_for_batch_job` gives the batch
script SLURM_NTASKS (the job's task count) and no SLURM_STEP_*; slurmstepd sets SLURM_PROCID and SLURM_LOCALID in
both (0 in the batch step: src/slurmd/slurmstepd/task.c). A process of the batch step is one process, whatever
SLURM_NTASKS says: `python launch/x.py` in an sbatch script runs alone, `srun python launch/x.py` runs the job's tasks.
In a heterogeneous step SLURM_PROCID and SLURM_STEP_NUM_TASKS count the whole step, but SLURM_JOB_ID is each
component's own id: the port comes from the first component's (SLURM_JOB_ID_HET_GROUP_0).

torchrun and the deepspeed launcher set RANK and WORLD_SIZE themselves: their values are never replaced.
`deepspeed --launcher slurm` runs the script under srun with MASTER_ADDR and MASTER_PORT exported and no RANK:
those two are kept, the rest derived.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from typing import Mapping, Optional

from ..config import ConfigError

# Users' ports sit below Linux's ephemeral range (32768-60999), so a derived port rarely meets a client socket;
# jobs on the same node differ in SLURM_JOB_ID and so in port.
PORT_BASE, PORT_SPAN = 15000, 10000

_RANGE = re.compile(r'^(\d+)(?:-(\d+))?$')


def expand_nodelist(nodelist: str) -> list[str]:
    """Slurm's compressed host list in full, in order: `gpu-a[001-003,010],gpu-b7` -> gpu-a001, gpu-a002, gpu-a003,
    gpu-a010, gpu-b7; zero padding is kept; several bracket groups in one name expand as their product."""
    hosts = []
    for name in _split_top_level(nodelist.strip(), nodelist):
        hosts.extend(_expand_name(name, nodelist))
    return hosts


def _split_top_level(text: str, whole: str) -> list[str]:
    """Split at the commas outside brackets."""
    parts, depth, start = [], 0, 0
    for i, ch in enumerate(text):
        depth += {'[': 1, ']': -1}.get(ch, 0)
        if depth not in (0, 1):
            raise ConfigError(f'SLURM_JOB_NODELIST {whole!r}: unbalanced or nested brackets')
        if ch == ',' and depth == 0:
            parts.append(text[start:i])
            start = i + 1
    if depth:
        raise ConfigError(f'SLURM_JOB_NODELIST {whole!r}: unbalanced brackets')
    parts.append(text[start:])
    if not all(parts):
        raise ConfigError(f'SLURM_JOB_NODELIST {whole!r}: an empty host name')
    return parts


def _expand_name(name: str, whole: str) -> list[str]:
    open_at = name.find('[')
    if open_at < 0:
        if ']' in name:
            raise ConfigError(f'SLURM_JOB_NODELIST {whole!r}: unbalanced brackets')
        return [name]
    close_at = name.index(']', open_at)
    prefix, inner, rest = name[:open_at], name[open_at + 1 : close_at], name[close_at + 1 :]
    tails = _expand_name(rest, whole) if rest else ['']
    return [prefix + value + tail for value in _range_values(inner, whole) for tail in tails]


def _range_values(inner: str, whole: str) -> list[str]:
    values = []
    for item in inner.split(','):
        m = _RANGE.match(item)
        if not m:
            raise ConfigError(f'SLURM_JOB_NODELIST {whole!r}: {item!r} is not a number or a range a-b')
        lo, hi = m.group(1), m.group(2) or m.group(1)
        if int(hi) < int(lo):
            raise ConfigError(f'SLURM_JOB_NODELIST {whole!r}: range {item!r} runs backwards')
        values += [str(n).zfill(len(lo)) for n in range(int(lo), int(hi) + 1)]
    return values


def first_host(nodelist: str) -> str:
    """The job's first node: `scontrol show hostnames` where Slurm's tools are installed, else our expansion."""
    if shutil.which('scontrol'):
        try:
            out = subprocess.run(
                ['scontrol', 'show', 'hostnames', nodelist], capture_output=True, text=True, timeout=30, check=True
            ).stdout.split()
            if out:
                return out[0]
        except (OSError, subprocess.SubprocessError):
            pass  # our own expansion reads the same list
    return expand_nodelist(nodelist)[0]


def _int(env: Mapping[str, str], key: str) -> int:
    try:
        return int(env[key])
    except (KeyError, ValueError):
        raise ConfigError(f'{key}={env.get(key)!r}: a Slurm task needs it as an integer') from None


def in_step(env: Mapping[str, str]) -> bool:
    """A task srun started (a job step), not the batch script's process (the batch step)."""
    return 'SLURM_PROCID' in env and 'SLURM_STEP_NUM_TASKS' in env


def in_batch_step(env: Mapping[str, str]) -> bool:
    return 'SLURM_PROCID' in env and 'SLURM_JOB_ID' in env and 'SLURM_STEP_NUM_TASKS' not in env


def slurm_rank(env: Mapping[str, str]) -> Optional[int]:
    """This task's rank when srun started it without a launcher (no RANK/WORLD_SIZE), else None."""
    if 'RANK' in env or 'WORLD_SIZE' in env or not in_step(env):
        return None
    return _int(env, 'SLURM_PROCID')


def slurm_env(env: Mapping[str, str]) -> Optional[dict]:
    """The torch.distributed variables for a task of an srun step, or None when a launcher has set RANK/WORLD_SIZE
    or the process is no task of a step (the batch step, salloc's shell, no Slurm)."""
    if slurm_rank(env) is None:
        return None
    rank, world = _int(env, 'SLURM_PROCID'), _int(env, 'SLURM_STEP_NUM_TASKS')
    if not 0 <= rank < world:
        raise ConfigError(f'SLURM_PROCID {rank} is outside the {world} tasks of SLURM_STEP_NUM_TASKS')
    out = {'RANK': str(rank), 'WORLD_SIZE': str(world), 'LOCAL_RANK': str(env.get('SLURM_LOCALID', '0'))}
    if 'MASTER_ADDR' not in env:
        nodelist = env.get('SLURM_STEP_NODELIST') or env.get('SLURM_JOB_NODELIST') or env.get('SLURM_NODELIST')
        if not nodelist:
            raise ConfigError('SLURM_STEP_NODELIST is not set: cannot tell the master address (set MASTER_ADDR)')
        out['MASTER_ADDR'] = first_host(nodelist)
    if 'MASTER_PORT' not in env:
        job_key = 'SLURM_JOB_ID_HET_GROUP_0' if 'SLURM_JOB_ID_HET_GROUP_0' in env else 'SLURM_JOB_ID'
        out['MASTER_PORT'] = str(PORT_BASE + _int(env, job_key) % PORT_SPAN)
    return out
