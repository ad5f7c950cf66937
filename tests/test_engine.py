"""Single-process runs of launch/pretrain.py: resume, kill during save, non-finite loss, config errors."""

import json

import pytest
import torch
from PIL import Image

from engine_helpers import TINY, run_python, tail, write_ds
from helpers import model_state

pytestmark = [pytest.mark.slow]


@pytest.fixture(scope='module')
def image_folder(tmp_path_factory):
    """12 real JPEGs in 2 classes: 3 micro-batches of 4 per epoch, so 8 steps cross two epoch boundaries."""
    root = tmp_path_factory.mktemp('imgs')
    gen = torch.Generator().manual_seed(0)
    for i in range(12):
        d = root / f'class_{i % 2}'
        d.mkdir(exist_ok=True)
        pixels = torch.randint(0, 256, (48 + i, 40 + 2 * i, 3), generator=gen, dtype=torch.uint8).numpy()
        Image.fromarray(pixels).save(d / f'img_{i}.jpg', quality=90)
    return root


def pretrain(tmp_path, run, folder, *extra, env=None, script=('launch/pretrain.py',)):
    ds = write_ds(tmp_path)
    args = [
        *script,
        '--deepspeed_config',
        ds,
        *TINY,
        'data.source=folder',
        f'data.root={folder}',
        'data.pipeline=torch',
        'data.num_workers=0',
        'train.epochs=10',
        'train.warmup_epochs=1',
        'train.save_every_steps=2',
        'train.keep_last=2',
        f'train.output_dir={tmp_path / run}',
        *extra,
    ]
    return run_python(args, extra_env=env)


def final_state(tmp_path, run):
    return model_state(tmp_path / run / 'model.safetensors')


def assert_same_weights(a, b):
    assert a.keys() == b.keys()
    for k in a:
        if a[k].is_floating_point():
            assert torch.allclose(a[k], b[k], rtol=1e-6, atol=1e-7), k
        else:
            assert torch.equal(a[k], b[k]), k


def test_resume_continues_exactly_and_survives_a_kill_during_save(tmp_path, image_folder):
    straight = pretrain(tmp_path, 'straight', image_folder, 'train.max_steps=8')
    assert straight.returncode == 0, tail(straight)
    # a run killed while writing step 6: files on disk, no completion marker
    killed = pretrain(
        tmp_path,
        'split',
        image_folder,
        'train.max_steps=8',
        script=('tests/dist_scripts/kill_during_save.py', 'step_00000006'),
    )
    assert killed.returncode != 0
    ckpts = tmp_path / 'split' / 'checkpoints'
    assert (ckpts / 'step_00000006').is_dir() and not (ckpts / 'step_00000006' / 'complete.json').exists()
    assert (ckpts / 'latest').read_text() == 'step_00000004'
    resumed = pretrain(tmp_path, 'split', image_folder, 'train.max_steps=4')
    assert resumed.returncode == 0, tail(resumed)
    assert 'resumed from step_00000004' in resumed.stdout + resumed.stderr
    assert_same_weights(final_state(tmp_path, 'straight'), final_state(tmp_path, 'split'))
    # keep_last=2 and the partial step_6 was replaced by the completed one
    assert sorted(p.name for p in ckpts.iterdir() if p.is_dir()) == ['step_00000006', 'step_00000008']


def test_existing_run_is_never_overwritten(tmp_path, image_folder):
    first = pretrain(tmp_path, 'run', image_folder, 'train.max_steps=2')
    assert first.returncode == 0, tail(first)
    again = pretrain(tmp_path, 'run', image_folder, 'train.max_steps=2', '--resume', 'none')
    assert again.returncode == 2 and 'already holds checkpoints' in again.stderr
    assert (tmp_path / 'run' / 'checkpoints' / 'latest').read_text() == 'step_00000002'


def test_non_finite_loss_stops_and_keeps_last_good_checkpoint(tmp_path, image_folder):
    proc = pretrain(
        tmp_path,
        'nan',
        image_folder,
        'train.max_steps=8',
        'train.base_lr=1e30',
        'train.warmup_epochs=0',
        'train.save_every_steps=1',
        'train.max_rollbacks=0',  # rollbacks off: the stop itself (test_rollback.py covers the budget's stop)
    )
    assert proc.returncode == 3, tail(proc)
    assert 'NaN or inf' in proc.stderr
    ckpts = tmp_path / 'nan' / 'checkpoints'
    latest = (ckpts / 'latest').read_text()
    assert (ckpts / latest / 'complete.json').is_file()
    state = torch.load(next((ckpts / latest).glob('mp_rank_00_model_states.pt')), weights_only=False)
    assert all(torch.isfinite(v).all() for v in state['module'].values() if v.is_floating_point())


def test_config_errors_name_the_key(tmp_path):
    ds = write_ds(tmp_path, train_batch_size=7)
    proc = run_python(['launch/pretrain.py', '--deepspeed_config', ds, *TINY])
    assert proc.returncode == 2 and 'train_batch_size' in proc.stderr and 'Traceback' not in proc.stderr
    proc = run_python(['launch/pretrain.py', '--deepspeed_config', write_ds(tmp_path), *TINY, 'train.epoks=3'])
    assert proc.returncode == 2 and 'epoks' in proc.stderr and 'Traceback' not in proc.stderr
    bad = tmp_path / 'bad.json'
    bad.write_text('{"train_micro_batch_size_per_gpu": 4,')
    proc = run_python(['launch/pretrain.py', '--deepspeed_config', str(bad), *TINY])
    assert proc.returncode == 2 and 'bad.json' in proc.stderr


def test_run_folder_holds_configs_logs_and_images(tmp_path, image_folder):
    proc = pretrain(tmp_path, 'run', image_folder, 'train.max_steps=3', 'train.image_every_steps=2')
    assert proc.returncode == 0, tail(proc)
    run = tmp_path / 'run'
    assert json.loads((run / 'ds_config.json').read_text())['train_micro_batch_size_per_gpu'] == 4
    assert 'model:' in (run / 'config.yaml').read_text()
    assert list((run / 'tensorboard').glob('events.out.tfevents.*'))
    assert (run / 'images' / 'step_00000002.png').is_file()
    assert 'checkpoint:' in proc.stdout and 'tensorboard' in proc.stdout


def test_bf16_on_one_process_trains_and_resumes(tmp_path, image_folder):
    """One rank is the single-GPU case: the projector BatchNorm takes the local path next to DeepSpeed's bf16
    weights and fp32 buffers (this once failed with "expected scalar type BFloat16 but found Float"). ZeRO-2: the
    same DeepSpeed optimizer class as ZeRO-1; the fine-tuning tests cover bf16 without ZeRO."""
    ds = write_ds(tmp_path, bf16={'enabled': True}, zero_optimization={'stage': 2})
    args = [
        'launch/pretrain.py',
        '--deepspeed_config',
        ds,
        *TINY,
        'data.source=folder',
        f'data.root={image_folder}',
        'data.pipeline=torch',
        'data.num_workers=0',
        'train.epochs=10',
        'train.warmup_epochs=1',
        'train.save_every_steps=2',
        f'train.output_dir={tmp_path / "run"}',
    ]
    first = run_python(args + ['train.max_steps=2'])
    assert first.returncode == 0, tail(first)
    again = run_python(args + ['train.max_steps=2', '--resume', 'auto'])
    assert again.returncode == 0, tail(again)
    assert (tmp_path / 'run' / 'checkpoints' / 'latest').read_text() == 'step_00000004'
    state = final_state(tmp_path, 'run')
    assert state['projector.bn0.running_mean'].dtype == torch.float32
    assert all(torch.isfinite(v).all() for v in state.values() if v.is_floating_point())
