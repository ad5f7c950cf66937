"""DeepSpeed JSON validation: every rule names its key and the file, and the user's dict is never written."""

import copy
import dataclasses
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from cmae_ds.config import Config, ConfigError, load_config
from cmae_ds.config.ds_config import ResolvedBatch, check_precision_supported, load_ds_config, validate

from helpers import free_port

REPO = Path(__file__).resolve().parents[1]
PATH = 'ds_configs/test.json'


def base(**extra):
    ds = {
        'train_micro_batch_size_per_gpu': 16,
        'gradient_accumulation_steps': 2,
        'bf16': {'enabled': True},
        'zero_optimization': {'stage': 2},
    }
    ds.update(extra)
    return ds


def check(ds, world=4, cfg=None):
    return validate(ds, cfg or Config(), world, path=PATH)


def fails(ds, *words, world=4, cfg=None):
    with pytest.raises(ConfigError) as err:
        check(ds, world, cfg)
    message = str(err.value)
    assert PATH in message, message
    for word in words:
        assert word in message, message
    return message


def test_resolved_values():
    r = check(base())
    assert r == ResolvedBatch(
        micro_batch=16, grad_accum=2, global_batch=128, precision='bf16', zero_stage=2, offload_optimizer=False
    )
    with pytest.raises(dataclasses.FrozenInstanceError):
        r.micro_batch = 3


@pytest.mark.parametrize(
    'keys, expect',
    [
        (dict(train_batch_size=128, train_micro_batch_size_per_gpu=16, gradient_accumulation_steps=2), (16, 2, 128)),
        (dict(train_batch_size=128, train_micro_batch_size_per_gpu=16), (16, 2, 128)),
        (dict(train_batch_size=128, gradient_accumulation_steps=2), (16, 2, 128)),
        (dict(train_micro_batch_size_per_gpu=16, gradient_accumulation_steps=2), (16, 2, 128)),
        (dict(train_batch_size=128), (32, 1, 128)),
        (dict(train_micro_batch_size_per_gpu=16), (16, 1, 64)),
    ],
)
def test_two_of_three_derive_the_third_without_writing(keys, expect):
    ds = {'zero_optimization': {'stage': 1}, **keys}
    before = copy.deepcopy(ds)
    r = check(ds, world=4)
    assert (r.micro_batch, r.grad_accum, r.global_batch) == expect
    assert ds == before


def test_input_never_mutated_even_on_error():
    for ds in (
        base(),
        base(train_batch_size=999),
        base(fp16={'enabled': True}),
        {'train_batch_size': 64, 'zero_optimization': {'stage': 3, 'offload_optimizer': {'device': 'cpu'}}},
    ):
        before = copy.deepcopy(ds)
        try:
            check(ds)
        except ConfigError:
            pass
        assert ds == before


def test_batch_mismatch_names_keys():
    fails(
        base(train_batch_size=100),
        'train_batch_size 100',
        'train_micro_batch_size_per_gpu 16',
        'gradient_accumulation_steps 2',
        'world size 4',
    )


def test_batch_not_divisible():
    fails({'train_batch_size': 100, 'train_micro_batch_size_per_gpu': 16}, 'train_batch_size 100')
    fails({'train_batch_size': 10}, 'train_batch_size 10', 'world size 4')


def test_batch_missing_or_bad():
    fails({'gradient_accumulation_steps': 2}, 'train_micro_batch_size_per_gpu')
    fails(base(train_micro_batch_size_per_gpu=0), 'train_micro_batch_size_per_gpu')
    fails(base(gradient_accumulation_steps=1.5), 'gradient_accumulation_steps')
    fails(base(train_batch_size=True), 'train_batch_size')


def test_auto_rejected():
    fails(base(train_batch_size='auto'), 'train_batch_size', '"auto"')
    fails(base(bf16={'enabled': 'auto'}), 'bf16.enabled', '"auto"')
    fails(base(gradient_clipping='auto'), 'gradient_clipping')
    fails(base(zero_optimization={'stage': 2, 'reduce_bucket_size': 'auto'}), 'zero_optimization.reduce_bucket_size')
    # DeepSpeed's own "auto" (buffers kept in fp32 by the model's own list) is fine.
    check(base(data_types={'keep_in_fp32_modules': 'auto'}))


def test_precision():
    assert check(base()).precision == 'bf16'
    assert check(base(bf16={'enabled': False}, fp16={'enabled': True})).precision == 'fp16'
    assert check({'train_micro_batch_size_per_gpu': 4}).precision == 'fp32'
    assert check({'train_micro_batch_size_per_gpu': 4, 'bfloat16': {'enabled': True}}).precision == 'bf16'
    fails(base(fp16={'enabled': True}), 'bf16.enabled', 'fp16.enabled')
    fails(base(bf16={'enabled': 'yes'}), 'bf16.enabled')
    fails(base(bfloat16={'enabled': True}), 'bfloat16')
    fails(base(bf16={'enabeld': True}), "bf16.'enabeld'", "bf16.'enabled'")


@pytest.mark.parametrize('stage', [-1, 4, '2', 1.0, True, None])
def test_bad_zero_stage(stage):
    fails(base(zero_optimization={'stage': stage}), 'zero_optimization.stage')


def test_zero_default_is_stage_0():
    assert check({'train_micro_batch_size_per_gpu': 4}).zero_stage == 0


def test_offload_rules():
    off = {'device': 'cpu', 'pin_memory': True}
    for stage in (1, 2, 3):
        r = check(base(zero_optimization={'stage': stage, 'offload_optimizer': off}))
        assert r.offload_optimizer and r.zero_stage == stage
    fails(
        base(zero_optimization={'stage': 0, 'offload_optimizer': off}),
        'zero_optimization.offload_optimizer',
        'stage is 0',
    )
    fails(
        base(zero_optimization={'stage': 2, 'offload_optimizer': {'device': 'nvme'}}),
        'zero_optimization.offload_optimizer.device',
    )
    for stage in (0, 1, 2):
        fails(
            base(zero_optimization={'stage': stage, 'offload_param': off}),
            'zero_optimization.offload_param',
            f'stage is {stage}',
        )
    assert check(base(zero_optimization={'stage': 3, 'offload_param': off})).zero_stage == 3
    # device "none" is DeepSpeed's way of writing "no offload"
    r = check(base(zero_optimization={'stage': 0, 'offload_optimizer': {'device': 'none'}}))
    assert not r.offload_optimizer
    fails(
        base(zero_optimization={'stage': 3, 'offload_param': {'device': 'gpu'}}),
        'zero_optimization.offload_param.device',
    )


def test_typos_get_a_suggestion():
    fails(base(gradient_cliping=1.0), "'gradient_cliping'", "'gradient_clipping'")
    fails(base(train_micro_batch_size_per_gp=4), "'train_micro_batch_size_per_gpu'")
    fails(base(zero_optimization={'stgae': 2}), "zero_optimization.'stgae'", "zero_optimization.'stage'")
    # Keys that resemble nothing are DeepSpeed's business, not a typo.
    check(base(some_future_deepspeed_section={'x': 1}))


@pytest.mark.parametrize(
    'section, hint',
    [
        ('optimizer', 'train.'),
        ('scheduler', 'cmae_ds.engine.schedules'),
        ('activation_checkpointing', 'model.activation_checkpointing'),
    ],
)
def test_sections_owned_by_yaml(section, hint):
    fails(base(**{section: {'type': 'AdamW', 'params': {}}}), f'"{section}"', 'remove', hint)


def test_gradient_clipping():
    check(base(gradient_clipping=0.0))
    check(base(gradient_clipping=3))
    fails(base(gradient_clipping=-1.0), 'gradient_clipping')
    fails(base(gradient_clipping='3'), 'gradient_clipping')


def test_cmae_needs_two_samples_for_batchnorm():
    fails({'train_micro_batch_size_per_gpu': 1}, 'train_micro_batch_size_per_gpu 1', world=1)
    check({'train_micro_batch_size_per_gpu': 1}, world=2)
    check({'train_micro_batch_size_per_gpu': 1}, world=1, cfg=load_config(overrides=['model.mode=mae']))


def test_world_size_must_be_positive():
    fails(base(), 'world size', world=0)


def test_load_ds_config_errors(tmp_path):
    with pytest.raises(ConfigError, match='nope.json.*not found'):
        load_ds_config(str(tmp_path / 'nope.json'))
    bad = tmp_path / 'bad.json'
    bad.write_text('{"train_batch_size": 8,}')
    with pytest.raises(ConfigError, match=r'bad\.json.*not valid JSON.*line 1'):
        load_ds_config(str(bad))
    arr = tmp_path / 'arr.json'
    arr.write_text('[1, 2]')
    with pytest.raises(ConfigError, match=r'arr\.json.*JSON object'):
        load_ds_config(str(arr))
    good = tmp_path / 'good.json'
    good.write_text(json.dumps(base()))
    assert load_ds_config(str(good)) == base()


_ENGINE_SCRIPT = textwrap.dedent("""
    import copy, json, sys
    import torch, deepspeed
    from cmae_ds.config import load_config
    from cmae_ds.config.ds_config import load_ds_config, validate
    path = sys.argv[1]
    ds = load_ds_config(path)
    before = copy.deepcopy(ds)
    resolved = validate(ds, load_config('debug'), 1, path=path)
    deepspeed.init_distributed(dist_backend='gloo')
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 2)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=opt, config=ds)
    x = torch.randn(resolved.micro_batch, 4)
    losses = []
    for _ in range(5):
        loss = engine(x).pow(2).mean()
        engine.backward(loss)
        engine.step()
        losses.append(loss.item())
    assert ds == before, 'deepspeed.initialize changed the dict'
    print('RESULT', json.dumps(dict(losses=losses, micro=engine.train_micro_batch_size_per_gpu(),
                                    accum=engine.gradient_accumulation_steps(),
                                    global_batch=engine.train_batch_size(), resolved=resolved.__dict__)))
""")


def test_cpu_debug_builds_a_real_engine():
    """cpu_debug.json drives a real DeepSpeed engine on the CPU (gloo, one process) and agrees with validate()."""
    env = dict(
        os.environ,
        MASTER_ADDR='127.0.0.1',
        MASTER_PORT=str(free_port()),
        RANK='0',
        WORLD_SIZE='1',
        LOCAL_RANK='0',
        PYTHONPATH=str(REPO),
        CUDA_VISIBLE_DEVICES='',
    )
    proc = subprocess.run(
        [sys.executable, '-c', _ENGINE_SCRIPT, 'ds_configs/cpu_debug.json'],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    line = next(l for l in proc.stdout.splitlines() if l.startswith('RESULT '))
    out = json.loads(line[len('RESULT ') :])
    assert out['losses'][-1] < out['losses'][0]
    r = out['resolved']
    assert (out['micro'], out['accum'], out['global_batch']) == (r['micro_batch'], r['grad_accum'], r['global_batch'])
    assert r['precision'] == 'fp32'


class _Accel:
    def __init__(self, fp16: bool, bf16: bool):
        self.fp16, self.bf16 = fp16, bf16

    def is_fp16_supported(self):
        return self.fp16

    def is_bf16_supported(self):
        return self.bf16

    def device_name(self):
        return 'cpu'


@pytest.mark.parametrize(
    'precision,accel,ok',
    [
        ('fp16', _Accel(fp16=False, bf16=True), False),
        ('fp16', _Accel(fp16=True, bf16=True), True),
        ('bf16', _Accel(fp16=True, bf16=False), False),
        ('bf16', _Accel(fp16=False, bf16=True), True),
        ('fp32', _Accel(fp16=False, bf16=False), True),
    ],
)
def test_precision_the_accelerator_cannot_run_is_a_config_error(precision, accel, ok):
    resolved = validate(
        {'train_micro_batch_size_per_gpu': 4, precision: {'enabled': True}}
        if precision != 'fp32'
        else {'train_micro_batch_size_per_gpu': 4},
        None,
        1,
        path='x.json',
    )
    assert resolved.precision == precision
    if ok:
        check_precision_supported(resolved, 'x.json', accel)
    else:
        with pytest.raises(ConfigError, match=rf'x\.json: {precision}\.enabled is true.*does not support'):
            check_precision_supported(resolved, 'x.json', accel)


def test_fp16_on_this_cpu_stops_with_the_file_named(tmp_path):
    from deepspeed.accelerator import get_accelerator

    if get_accelerator().is_fp16_supported():
        pytest.skip('this machine runs fp16')
    from engine_helpers import TINY, run_python, write_ds

    ds = write_ds(tmp_path, fp16={'enabled': True})
    proc = run_python(['launch/pretrain.py', '--deepspeed_config', ds, *TINY, f'train.output_dir={tmp_path / "r"}'])
    assert proc.returncode == 2 and 'ds.json: fp16.enabled is true' in proc.stderr, proc.stderr[-2000:]
    assert 'Traceback' not in proc.stderr
