"""The real DeepSpeed launcher and engine, two CPU ranks on gloo."""

import subprocess
from pathlib import Path

import pytest
import torch

from engine_helpers import DEEPSPEED, ROOT, TINY, env, run_deepspeed, tail, write_ds
from helpers import free_port, rel

pytestmark = [pytest.mark.slow, pytest.mark.dist]

EMA_ARGS = TINY + [
    'train.max_steps=3',
    'train.momentum_base=0.9',
    'train.momentum_end=0.9',
    'train.warmup_epochs=0',
    'train.base_lr=0.1',
]


def independent_ema(result, m=0.9):
    """The recurrence from the target's start (the fp32 online weights before DeepSpeed's cast) over the online
    weights seen after each optimizer step."""
    steps = result['online']
    ema = dict(result['target_start'])
    for _, online in steps[1:]:
        ema = {n: m * ema[n] + (1 - m) * online[n] for n in ema}
    return ema


@pytest.mark.parametrize('stage,accum,bf16', [(1, 1, False), (2, 2, False), (3, 2, False), (2, 1, True)])
def test_target_is_ema_of_online_weights_under_zero(tmp_path, stage, accum, bf16):
    """With bf16 the online weights are bf16 while the target stays fp32 and moves by the fp32 amount."""
    ds = write_ds(
        tmp_path, zero_optimization={'stage': stage}, gradient_accumulation_steps=accum, bf16={'enabled': bf16}
    )
    out = tmp_path / 'ema.pt'
    proc = run_deepspeed(
        [
            'tests/dist_scripts/probe.py',
            '--mode',
            'ema',
            '--deepspeed_config',
            ds,
            '--out',
            str(out),
            *EMA_ARGS,
            f'train.output_dir={tmp_path / "run"}',
        ]
    )
    assert proc.returncode == 0, tail(proc)
    result = torch.load(out, weights_only=True)
    assert [s for s, _ in result['online']] == [0, 1, 2, 3]  # one EMA per optimizer step, not per micro-step
    ema = independent_ema(result)
    for name, start in result['target_start'].items():  # the target starts as the online weights
        assert torch.allclose(start, result['online'][0][1][name], rtol=2**-8 if bf16 else 0, atol=0), name
    moved = max(rel(result['online'][-1][1][n], result['online'][0][1][n]) for n in ema)
    assert moved > 1e-3  # the online weights really trained
    for name, value in ema.items():
        assert result['target'][name].dtype == torch.float32
        assert torch.allclose(result['target'][name], value, rtol=1e-5, atol=1e-6), name
    if bf16:  # a bf16 target could not even hold the first update: 0.1 x a bf16 step is below its resolution
        first = {n: result['online'][0][1][n] for n in ema}
        assert any(not torch.equal(result['target'][n], first[n].bfloat16().float()) for n in ema)


def test_two_ranks_match_one_rank_on_the_same_global_batch(tmp_path):
    results = {}
    for ranks, micro in ((1, 8), (2, 4)):
        ds = write_ds(tmp_path, f'ds{ranks}.json', train_micro_batch_size_per_gpu=micro, zero_optimization={'stage': 2})
        out = tmp_path / f'loss{ranks}.pt'
        proc = run_deepspeed(
            ['tests/dist_scripts/probe.py', '--mode', 'loss', '--deepspeed_config', ds, '--out', str(out), *TINY],
            num_gpus=ranks,
        )
        assert proc.returncode == 0, tail(proc)
        results[ranks] = torch.load(out, weights_only=True)
    one, two = results[1], results[2]
    # the contrastive logits span the global batch and the projector BatchNorm is synchronized
    assert torch.allclose(two['loss'], one['loss'], rtol=1e-5)
    flat = lambda r: torch.cat([g.reshape(-1) for g in r['grads'].values()])  # noqa: E731
    assert rel(flat(two), flat(one)) < 1e-5
    scale = flat(one).abs().max()
    for name, g in one['grads'].items():
        assert torch.allclose(two['grads'][name], g, rtol=1e-4, atol=1e-6 * scale), name


def test_two_nodes_with_hostfile_no_ssh(tmp_path):
    hosts = tmp_path / 'hosts'
    hosts.write_text('node0 slots=1\nnode1 slots=1\n')
    ds = write_ds(tmp_path, zero_optimization={'stage': 1})
    port = str(free_port())
    args = [
        'launch/pretrain.py',
        '--deepspeed_config',
        ds,
        *TINY,
        'train.max_steps=2',
        f'train.output_dir={tmp_path / "run"}',
    ]
    procs = [
        subprocess.Popen(
            [
                DEEPSPEED,
                '--hostfile',
                str(hosts),
                '--no_ssh',
                '--node_rank',
                str(node),
                '--master_addr',
                '127.0.0.1',
                '--master_port',
                port,
                *args,
            ],
            cwd=ROOT,
            env=env(),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for node in (0, 1)
    ]
    outputs = [p.communicate(timeout=300)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outputs[0][-2000:] + outputs[1][-2000:]
    assert 'global batch 8' in outputs[0]  # 2 nodes x 1 rank x micro 4
    assert (tmp_path / 'run' / 'checkpoints' / 'latest').read_text() == 'step_00000002'
    # each rank keeps its own random streams (DeepSpeed's client state is rank 0's alone)
    states = [
        torch.load(tmp_path / 'run' / 'checkpoints' / 'step_00000002' / f'rank_state_{r:05d}.pt', weights_only=False)
        for r in (0, 1)
    ]
    assert not torch.equal(states[0]['mask_rng'], states[1]['mask_rng'])


def test_runs_leave_no_shared_memory_behind(tmp_path):
    """DeepSpeed's CPU communication op leaves a 69 MB segment per rank in /dev/shm (RAM) unless the run unlinks
    the names once every rank has mapped them (cmae_ds.engine.dist). Only this run's segments are looked for (named
    after its master port): runs of tests beside this one (pytest-xdist) hold theirs while they run."""
    shm = Path('/dev/shm')
    if not shm.is_dir():
        pytest.skip('no /dev/shm here')
    port = free_port()
    ds = write_ds(tmp_path, zero_optimization={'stage': 2})
    args = ['launch/pretrain.py', '--deepspeed_config', ds, *TINY, 'train.max_steps=2']
    proc = run_deepspeed([*args, f'train.output_dir={tmp_path / "run"}'], port=port)
    assert proc.returncode == 0, tail(proc)
    assert list(shm.glob(f'deepspeed_allreduce_buffer_*_{port}_*')) == []
