"""Tasks started by srun without a launcher: Slurm's compressed host lists and the torch.distributed environment
derived from a task's Slurm variables (cmae_ds/engine/slurm.py). A task of a step carries SLURM_STEP_NUM_TASKS and
SLURM_STEP_NODELIST (SchedMD/slurm src/common/env.c, `env_array_for_step`); tests/test_placement.py holds the
batch step, salloc, heterogeneous steps and the launchers."""

import pytest

from cmae_ds.config import ConfigError
from cmae_ds.engine import slurm
from cmae_ds.engine.slurm import expand_nodelist, slurm_env


@pytest.mark.parametrize(
    'nodelist,hosts',
    [
        ('gpu-a[001-003,010],gpu-b7', ['gpu-a001', 'gpu-a002', 'gpu-a003', 'gpu-a010', 'gpu-b7']),
        ('node[01-04,07]', ['node01', 'node02', 'node03', 'node04', 'node07']),
        ('node17', ['node17']),
        ('login-1.cluster.org', ['login-1.cluster.org']),
        ('n[8-11]', ['n8', 'n9', 'n10', 'n11']),  # no padding: the numbers grow in width
        ('r[1-2]c[07-08]', ['r1c07', 'r1c08', 'r2c07', 'r2c08']),  # two groups in one name: their product
        ('a[1,3]-ib,b[09-10]-ib,c', ['a1-ib', 'a3-ib', 'b09-ib', 'b10-ib', 'c']),
        ('gpu[099-101]', ['gpu099', 'gpu100', 'gpu101']),
    ],
)
def test_nodelist_expands_as_scontrol_does(nodelist, hosts):
    assert expand_nodelist(nodelist) == hosts


@pytest.mark.parametrize(
    'nodelist,why',
    [
        ('node[01-04', 'unbalanced'),
        ('node01]', 'unbalanced'),
        ('node[[1]]', 'nested'),
        ('node[4-1]', 'backwards'),
        ('node[a-c]', 'not a number'),
        ('node1,,node2', 'empty host'),
    ],
)
def test_a_malformed_nodelist_is_one_clear_error(nodelist, why):
    with pytest.raises(ConfigError, match=f'SLURM_JOB_NODELIST.*{why}'):
        expand_nodelist(nodelist)


def task(procid, **extra):
    env = {
        'SLURM_PROCID': str(procid),
        'SLURM_NTASKS': '8',
        'SLURM_STEP_NUM_TASKS': '8',
        'SLURM_STEP_ID': '0',
        'SLURM_LOCALID': str(procid % 4),
        'SLURM_JOB_NODELIST': 'gpu-a[001-002]',
        'SLURM_STEP_NODELIST': 'gpu-a[001-002]',
        'SLURM_JOB_ID': '4242917',
    }
    return {**env, **extra}


def test_a_task_gets_rank_world_master_and_a_port_of_its_job(monkeypatch):
    monkeypatch.setattr(slurm.shutil, 'which', lambda _: None)  # no Slurm tools here: our own expansion
    derived = [slurm_env(task(r)) for r in range(8)]
    assert [d['RANK'] for d in derived] == [str(r) for r in range(8)]
    assert {d['WORLD_SIZE'] for d in derived} == {'8'}
    assert [d['LOCAL_RANK'] for d in derived] == ['0', '1', '2', '3'] * 2
    assert {d['MASTER_ADDR'] for d in derived} == {'gpu-a001'}
    assert {d['MASTER_PORT'] for d in derived} == {str(15000 + 4242917 % 10000)}
    other_job = slurm_env(task(0, SLURM_JOB_ID='4242918'))
    assert other_job['MASTER_PORT'] != derived[0]['MASTER_PORT']


def test_a_step_uses_its_own_tasks_and_nodes(monkeypatch):
    monkeypatch.setattr(slurm.shutil, 'which', lambda _: None)
    env = task(1, SLURM_STEP_NUM_TASKS='2', SLURM_STEP_NODELIST='gpu-a002')
    assert slurm_env(env) == {
        'RANK': '1',
        'WORLD_SIZE': '2',
        'LOCAL_RANK': '1',
        'MASTER_ADDR': 'gpu-a002',
        'MASTER_PORT': str(15000 + 4242917 % 10000),
    }


def test_only_task_0_takes_the_run_lock(monkeypatch):
    """The lock is taken before the process group exists: from SLURM_PROCID where no launcher set RANK."""
    from cmae_ds.engine.guards import run_lock

    batch_step = {k: v for k, v in task(0).items() if not k.startswith('SLURM_STEP')}
    cases = ((task(0), True), (task(1), False), (task(1, RANK='0'), True), ({}, True), (batch_step, True))
    for env, first in cases:
        for key in ('RANK', 'WORLD_SIZE', 'SLURM_PROCID', 'SLURM_STEP_NUM_TASKS'):
            monkeypatch.delenv(key, raising=False)
        for key, value in env.items():
            monkeypatch.setenv(key, value)
        assert run_lock._is_rank0() is first, env


def test_launchers_settings_are_kept():
    assert slurm_env(task(3, RANK='3', WORLD_SIZE='8')) is None  # torchrun, deepspeed
    assert slurm_env({'RANK': '0'}) is None
    assert slurm_env({}) is None  # no Slurm task
    # deepspeed --launcher slurm exports the master address and port, not the rank
    kept = slurm_env(task(2, MASTER_ADDR='10.0.0.5', MASTER_PORT='29500'))
    assert 'MASTER_ADDR' not in kept and 'MASTER_PORT' not in kept and kept['RANK'] == '2'


def test_scontrol_is_asked_where_it_exists(monkeypatch):
    calls = []

    class Done:
        stdout = 'gpu-a001\ngpu-a002\n'

    monkeypatch.setattr(slurm.shutil, 'which', lambda name: f'/usr/bin/{name}')
    monkeypatch.setattr(slurm.subprocess, 'run', lambda cmd, **kw: calls.append(cmd) or Done())
    assert slurm_env(task(0))['MASTER_ADDR'] == 'gpu-a001'
    assert calls == [['scontrol', 'show', 'hostnames', 'gpu-a[001-002]']]


@pytest.mark.parametrize(
    'env,match',
    [
        (task(8), 'SLURM_PROCID 8 is outside the 8 tasks'),
        (task(0, SLURM_STEP_NUM_TASKS='eight'), "SLURM_STEP_NUM_TASKS='eight'"),
        ({k: v for k, v in task(0).items() if 'NODELIST' not in k}, 'SLURM_STEP_NODELIST is not set'),
        ({k: v for k, v in task(0).items() if k != 'SLURM_JOB_ID'}, 'SLURM_JOB_ID=None'),
    ],
)
def test_an_incomplete_slurm_environment_is_one_clear_error(env, match):
    with pytest.raises(ConfigError, match=match):
        slurm_env(env)
