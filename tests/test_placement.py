"""Rank, world size, local rank and device decided from each launcher's environment before any process group exists
(cmae_ds/engine/placement.py, cmae_ds/engine/slurm.py). Each environment is the one the launcher sets, from its
sources:

- Slurm (SchedMD/slurm, commit 284c3b95, 2026-08-20): a step's tasks get SLURM_STEP_NUM_TASKS, SLURM_STEP_NODELIST,
  SLURM_STEP_TASKS_PER_NODE and SLURM_STEP_ID, and SLURM_NTASKS/SLURM_NNODES overwritten with the step's
  (src/common/env.c, `env_array_for_step`); the batch script gets SLURM_NTASKS, SLURM_JOB_NODELIST and no
  SLURM_STEP_* (`env_array_for_batch_job`); slurmstepd sets SLURM_PROCID = the task's global id (plus the component's
  offset in a heterogeneous step) and SLURM_LOCALID in both (src/slurmd/slurmstepd/task.c); salloc's shell gets
  SLURM_NTASKS and no SLURM_PROCID (src/salloc/salloc.c); a heterogeneous step gives each task its component's
  SLURM_JOB_ID (src/common/env.c, `setup_env`) and srun exports SLURM_JOB_ID_HET_GROUP_<n> (src/srun/srun_job.c);
  with --gpus-per-task each task's CUDA_VISIBLE_DEVICES lists its own GPUs only, as local indices under
  ConstrainDevices (all "0") or global ones without (src/plugins/gres/common/gres_common.c; srun(1): "--gpus-per-task
  ... will implicitly set --tres-bind=gres/gpu:per_task").
- torchrun: RANK, LOCAL_RANK, GROUP_RANK, LOCAL_WORLD_SIZE, WORLD_SIZE, GROUP_WORLD_SIZE, MASTER_ADDR/PORT,
  TORCHELASTIC_RESTART_COUNT, TORCHELASTIC_MAX_RESTARTS, TORCHELASTIC_RUN_ID, TORCHELASTIC_USE_AGENT_STORE
  (torch/distributed/elastic/agent/server/local_elastic_agent.py, `_start_workers`).
- deepspeed: RANK, LOCAL_RANK, WORLD_SIZE, MASTER_ADDR/PORT, CROSS_RANK, CROSS_SIZE, LOCAL_SIZE and
  CUDA_VISIBLE_DEVICES of the node's slots (deepspeed/launcher/launch.py); `--launcher slurm` runs
  `srun -n <slots> --gpus-per-node <n> --export=ALL,MASTER_ADDR=..,MASTER_PORT=..` (deepspeed/launcher/
  multinode_runner.py, SlurmRunner), so its tasks are a step's tasks with MASTER_* given.
- DeepSpeed then reads LOCAL_RANK as the device: `device_id=cuda:$LOCAL_RANK` (deepspeed/comm/torch.py) and
  `set_device(local_rank)` (deepspeed/runtime/engine.py).
"""

import pytest

from cmae_ds.config import ConfigError
from cmae_ds.engine import slurm
from cmae_ds.engine.placement import decide

JOB = {'SLURM_JOB_ID': '4242917', 'SLURM_JOBID': '4242917', 'SLURM_JOB_NODELIST': 'gpu-a[001-004]'}
PORT = str(15000 + 4242917 % 10000)


@pytest.fixture(autouse=True)
def no_scontrol(monkeypatch):
    monkeypatch.setattr(slurm.shutil, 'which', lambda _: None)


def gpus(env):
    """What CUDA counts from CUDA_VISIBLE_DEVICES (torch.cuda.device_count())."""
    return len(env['CUDA_VISIBLE_DEVICES'].split(',')) if 'CUDA_VISIBLE_DEVICES' in env else None


def batch_step(**extra):
    """`sbatch --nodes 4 --ntasks-per-node 8 --gpus-per-node 8`: the batch script's process on the first node."""
    return {
        **JOB,
        'SLURM_NODELIST': 'gpu-a[001-004]',
        'SLURM_NNODES': '4',
        'SLURM_NTASKS': '32',
        'SLURM_NPROCS': '32',
        'SLURM_TASKS_PER_NODE': '8(x4)',
        'SLURM_PROCID': '0',
        'SLURM_LOCALID': '0',
        'SLURM_NODEID': '0',
        'SLURM_GPUS_ON_NODE': '8',
        'CUDA_VISIBLE_DEVICES': '0,1,2,3,4,5,6,7',
        'ENVIRONMENT': 'BATCH',
        **extra,
    }


def step_task(procid, visible='0,1,2,3,4,5,6,7', nodes='gpu-a[001-004]', tasks=32, per_node=8, **extra):
    """A task of `srun` in that job: the batch step's variables, overwritten with the step's."""
    env = batch_step()
    env.update(
        SLURM_STEP_ID='0',
        SLURM_STEPID='0',
        SLURM_STEP_NUM_TASKS=str(tasks),
        SLURM_STEP_NUM_NODES='4',
        SLURM_STEP_NODELIST=nodes,
        SLURM_STEP_TASKS_PER_NODE=f'{per_node}(x4)',
        SLURM_NTASKS=str(tasks),
        SLURM_PROCID=str(procid),
        SLURM_LOCALID=str(procid % per_node),
        SLURM_NODEID=str(procid // per_node),
        CUDA_VISIBLE_DEVICES=visible,
    )
    env.pop('ENVIRONMENT')
    return {**env, **extra}


def test_a_plain_python_in_the_batch_step_is_one_process():
    env = batch_step()
    p = decide(env, gpus(env))
    assert (p.launcher, p.rank, p.world_size, p.local_rank, p.device) == ('sbatch', 0, 1, 0, 0)
    assert p.env['WORLD_SIZE'] == '1' and p.env['MASTER_ADDR'] == '127.0.0.1' and p.own_group
    assert slurm.slurm_env(env) is None


def test_an_srun_step_with_the_nodes_gpus_visible_takes_gpu_localid():
    env = step_task(11)
    p = decide(env, gpus(env))
    assert (p.launcher, p.rank, p.world_size, p.local_rank, p.device) == ('srun', 11, 32, 3, 3)
    assert p.env == dict(RANK='11', WORLD_SIZE='32', LOCAL_RANK='3', MASTER_ADDR='gpu-a001', MASTER_PORT=PORT)


@pytest.mark.parametrize('visible', ['0', '3'])  # ConstrainDevices: a local index; without: the global one
def test_gpus_per_task_gives_cuda_0_and_local_rank_0_whatever_the_local_id(visible):
    env = step_task(11, visible=visible)
    p = decide(env, gpus(env))
    assert (p.rank, p.world_size, p.device, p.local_rank) == (11, 32, 0, 0)
    assert p.env['LOCAL_RANK'] == '0'  # what DeepSpeed's init_distributed and engine will read


def test_more_tasks_on_a_node_than_visible_gpus_stops_in_one_line():
    env = step_task(6, visible='0,1,2,3')
    with pytest.raises(ConfigError, match=r'LOCAL_RANK 6 but this process sees 4 GPUs.*--gpus-per-task=1') as e:
        decide(env, gpus(env))
    assert '\n' not in str(e.value)


def test_salloc_shell_is_one_process_and_srun_inside_it_is_a_step():
    shell = {**JOB, 'SLURM_NTASKS': '8', 'SLURM_NNODES': '1', 'SLURM_JOB_NODELIST': 'gpu-b7'}
    assert decide(shell, None).launcher == 'python' and decide(shell, None).world_size == 1
    task = {**shell, 'SLURM_STEP_NUM_TASKS': '8', 'SLURM_STEP_NODELIST': 'gpu-b7', 'SLURM_STEP_ID': '0'}
    task.update(SLURM_PROCID='5', SLURM_LOCALID='5', SLURM_LAUNCH_NODE_IPADDR='10.1.0.1')  # the login node
    p = decide(task, None)
    assert (p.launcher, p.rank, p.world_size, p.env['MASTER_ADDR']) == ('srun', 5, 8, 'gpu-b7')


def test_a_heterogeneous_step_is_one_world_on_one_port():
    """`srun --het-group=0,1`: component 0 (job 700, 2 tasks on a1), component 1 (job 701, 4 tasks on b[1-2])."""
    common = {
        'SLURM_HET_SIZE': '2',
        'SLURM_JOB_ID_HET_GROUP_0': '700',
        'SLURM_JOB_ID_HET_GROUP_1': '701',
        'SLURM_STEP_NUM_TASKS': '6',
        'SLURM_STEP_NODELIST': 'a1,b[1-2]',
        'SLURM_STEP_ID': '0',
    }
    first = {**common, 'SLURM_JOB_ID': '700', 'SLURM_PROCID': '0', 'SLURM_LOCALID': '0'}
    later = {**common, 'SLURM_JOB_ID': '701', 'SLURM_PROCID': '4', 'SLURM_LOCALID': '0'}
    a, b = decide(first, None), decide(later, None)
    assert (a.rank, b.rank, a.world_size, b.world_size) == (0, 4, 6, 6)
    assert a.env['MASTER_PORT'] == b.env['MASTER_PORT'] == str(15000 + 700)
    assert a.env['MASTER_ADDR'] == b.env['MASTER_ADDR'] == 'a1'


def torchrun_worker(rank, nodes=2, per_node=8, **extra):
    return {
        'RANK': str(rank),
        'LOCAL_RANK': str(rank % per_node),
        'GROUP_RANK': str(rank // per_node),
        'ROLE_RANK': str(rank),
        'LOCAL_WORLD_SIZE': str(per_node),
        'WORLD_SIZE': str(nodes * per_node),
        'GROUP_WORLD_SIZE': str(nodes),
        'MASTER_ADDR': 'node01',
        'MASTER_PORT': '29500',
        'TORCHELASTIC_RESTART_COUNT': '0',
        'TORCHELASTIC_MAX_RESTARTS': '3',
        'TORCHELASTIC_RUN_ID': 'cmae',
        'TORCHELASTIC_USE_AGENT_STORE': 'True',
        **extra,
    }


def test_torchrun_single_and_multi_node_keep_their_settings():
    for nodes in (1, 2):
        p = decide(torchrun_worker(9 % (8 * nodes), nodes=nodes, CUDA_VISIBLE_DEVICES='0,1,2,3,4,5,6,7'), 8)
        assert (p.launcher, p.world_size, p.local_rank, p.device) == ('launcher', 8 * nodes, 1, 1)
        assert p.env == {}
    # torchrun under srun --gpus-per-task=1 (one agent per GPU): its LOCAL_RANK 0 is already the device
    assert decide(torchrun_worker(3, nodes=4, per_node=1), 1).env == {}


def test_srun_then_torchrun_is_the_launchers_world_not_the_steps():
    """`srun --ntasks-per-node 1 torchrun --nproc-per-node 8 ...`: the workers inherit the step's variables."""
    env = {**step_task(1, tasks=4, per_node=1), **torchrun_worker(12, nodes=4)}
    p = decide(env, gpus(env))
    assert (p.launcher, p.rank, p.world_size, p.device) == ('launcher', 12, 32, 4)


def deepspeed_rank(rank, node_rank=0, nodes=2, slots=8):
    return {
        'RANK': str(rank),
        'LOCAL_RANK': str(rank % slots),
        'WORLD_SIZE': str(nodes * slots),
        'MASTER_ADDR': 'node-01',
        'MASTER_PORT': '29500',
        'CROSS_RANK': str(node_rank),
        'CROSS_SIZE': str(nodes),
        'LOCAL_SIZE': str(slots),
        'CUDA_VISIBLE_DEVICES': ','.join(map(str, range(slots))),
    }


def test_launcher_ranks_sharing_one_gpu_stop_in_one_line():
    env = torchrun_worker(3, nodes=1, CUDA_VISIBLE_DEVICES='0')
    with pytest.raises(ConfigError, match='LOCAL_WORLD_SIZE=8 ranks on this node but 1 GPU') as e:
        decide(env, gpus(env))
    assert '\n' not in str(e.value)
    with pytest.raises(ConfigError, match='LOCAL_SIZE=8 ranks on this node but 4 GPU'):
        decide({**deepspeed_rank(3), 'CUDA_VISIBLE_DEVICES': '0,1,2,3'}, 4)


def test_deepspeed_with_a_hostfile_keeps_its_settings():
    env = deepspeed_rank(13, node_rank=1)
    p = decide(env, gpus(env))
    assert (p.launcher, p.rank, p.world_size, p.local_rank, p.device, p.env) == ('launcher', 13, 16, 5, 5, {})


def test_deepspeed_launcher_slurm_is_a_step_with_master_given():
    env = step_task(10, tasks=16, nodes='gpu-a[001-002]', MASTER_ADDR='gpu-a001', MASTER_PORT='29500')
    p = decide(env, gpus(env))
    assert (p.launcher, p.rank, p.world_size, p.device) == ('srun', 10, 16, 2)
    assert 'MASTER_ADDR' not in p.env and 'MASTER_PORT' not in p.env


@pytest.mark.parametrize(
    'env,count,match',
    [
        ({'RANK': '0', 'WORLD_SIZE': '2'}, None, 'RANK=0, WORLD_SIZE=2 is set but MASTER_ADDR, MASTER_PORT is not'),
        ({'WORLD_SIZE': '2', 'MASTER_ADDR': 'h', 'MASTER_PORT': '1'}, None, 'WORLD_SIZE=2 is set but RANK is not'),
        ({'RANK': '2', 'WORLD_SIZE': '2', 'MASTER_ADDR': 'h', 'MASTER_PORT': '1'}, None, 'outside WORLD_SIZE=2'),
        ({'RANK': '1', 'WORLD_SIZE': '2', 'MASTER_ADDR': 'h', 'MASTER_PORT': '1'}, 8, 'set LOCAL_RANK'),
    ],
)
def test_what_cannot_be_served_says_what_to_set(env, count, match):
    with pytest.raises(ConfigError, match=match) as e:
        decide(env, count)
    assert '\n' not in str(e.value)


def test_rank_and_world_without_local_rank_on_the_cpu_or_one_gpu():
    env = {'RANK': '1', 'WORLD_SIZE': '2', 'MASTER_ADDR': '127.0.0.1', 'MASTER_PORT': '29500'}
    # DeepSpeed looks for MPI where LOCAL_RANK is missing (deepspeed/comm/comm.py, init_distributed): it is set
    assert decide(env, None).env == {'LOCAL_RANK': '0'}
    assert decide(env, 1).env == {'LOCAL_RANK': '0'} and decide(env, 1).device == 0


class CudaOfOneGpu:
    """DeepSpeed's CUDA accelerator as a task bound to one GPU sees it (the CUDA choice, forced on this CPU)."""

    def device_name(self):
        return 'cuda'

    def device_count(self):
        return 1


def test_setup_sets_local_rank_0_before_deepspeed_reads_it(monkeypatch):
    from cmae_ds.engine import dist

    monkeypatch.setattr(dist, '_own_env', False)
    for key in ('RANK', 'WORLD_SIZE', 'LOCAL_RANK', 'MASTER_ADDR', 'MASTER_PORT'):
        monkeypatch.delenv(key, raising=False)  # restored as they were after the test
    for key, value in step_task(11, visible='3').items():
        monkeypatch.setenv(key, value)
    place = dist._place(CudaOfOneGpu())
    assert place.device == 0
    assert [dist.os.environ[k] for k in ('RANK', 'WORLD_SIZE', 'LOCAL_RANK')] == ['11', '32', '0']
