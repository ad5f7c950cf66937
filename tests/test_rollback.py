"""Runs that heal themselves: a poisoned image (inf pixels) and a finite loss spike, each rolled back to the newest
checkpoint before it with its data skipped; the budget; a resume from before a rollback; two ranks where only one sees
the NaN. Real launch/pretrain.py runs (debug model, real JPEGs); tests/dist_scripts/poisoned_run.py alters the
pipeline's and the model's outputs only."""

import json

import pytest
import torch
from PIL import Image
from test_engine import assert_same_weights, final_state

from cmae_ds.data.pipelines.sampling import ShardPlan
from cmae_ds.modelfiles.model_file import read_model_file

from engine_helpers import TINY, run_deepspeed, run_python, tail, write_ds
from finetune_helpers import write_class_folder

pytestmark = [pytest.mark.slow]
SCRIPT = 'tests/dist_scripts/poisoned_run.py'
IMAGES = 16


@pytest.fixture(scope='module')
def folder(tmp_path_factory):
    root = tmp_path_factory.mktemp('imgs')
    gen = torch.Generator().manual_seed(0)
    for i in range(IMAGES):
        d = root / f'class_{i % 2}'
        d.mkdir(exist_ok=True)
        pixels = torch.randint(0, 256, (40 + i, 36 + i, 3), generator=gen, dtype=torch.uint8).numpy()
        Image.fromarray(pixels).save(d / f'img_{i:02d}.jpg', quality=90)
    return root


def at(epoch: int, position: int, world: int = 1, seed: int = 0) -> int:
    """The dataset index at a global position of an epoch's order (micro-batch 4)."""
    return int(ShardPlan(IMAGES, 4, world_size=world, seed=seed).epoch_order(epoch)[position])


# one rank, 4 images a step, 4 steps an epoch, checkpoints every 2 steps: the inf image is read at step 3 (epoch 0,
# positions 8-11: back to step 2, skip them); the spike at step 5 (epoch 1, positions 4-7: back to step 4)
INF, SPIKE = at(0, 9), at(1, 5)
POISON = f'inf:0:{INF},spike:1:{SPIKE}'


def run(tmp_path, name, folder, *extra, poison=POISON, ranks=1, ds=None):
    args = [
        SCRIPT,
        poison,
        'pretrain',
        '--deepspeed_config',
        ds or write_ds(tmp_path),
        *TINY,
        'data.source=folder',
        f'data.root={folder}',
        'data.pipeline=torch',
        'data.num_workers=0',
        'train.epochs=10',
        'train.warmup_epochs=1',
        'train.save_every_steps=2',
        'train.keep_last=2',
        'train.skip_margin_steps=0',
        'train.spike_window_steps=2',
        'train.spike_steps=1',
        'train.rollback_lr_factor=0.5',
        'train.rollback_lr_steps=2',
        f'train.output_dir={tmp_path / name}',
        *extra,
    ]
    return run_python(args) if ranks == 1 else run_deepspeed(args, num_gpus=ranks)


def events(tmp_path, name):
    return json.loads((tmp_path / name / 'rollbacks.json').read_text())


def test_poison_and_spike_roll_back_resume_exactly_and_the_budget_stops(tmp_path, folder):
    healed = run(tmp_path, 'healed', folder, 'train.max_steps=8')
    assert healed.returncode == 0, tail(healed)
    assert 'done: 8 steps' in healed.stdout, tail(healed)
    nan, spike = events(tmp_path, 'healed')
    assert (nan['step'], nan['reason'], nan['ranks'], nan['checkpoint']) == (3, 'non-finite loss', [0], 'step_00000002')
    assert nan['skipped'] == [[0, 8, 12]] and INF in nan['skipped_images'] and len(nan['skipped_images']) == 4
    assert (spike['step'], spike['checkpoint'], spike['skipped']) == (5, 'step_00000004', [[1, 4, 8]])
    assert spike['reason'].startswith('loss spike') and SPIKE in spike['skipped_images']
    assert 'rolled back to step_00000002' in healed.stdout
    state = final_state(tmp_path, 'healed')
    assert all(torch.isfinite(v).all() for v in state.values() if v.is_floating_point())

    # stopped after the first rollback, then resumed from the checkpoint before it: the skip comes from
    # rollbacks.json, the lr window too, and the second event happens as in the healed run
    first = run(tmp_path, 'split', folder, 'train.max_steps=4')
    assert first.returncode == 0 and len(events(tmp_path, 'split')) == 1, tail(first)
    again = run(tmp_path, 'split', folder, 'train.max_steps=6', '--resume', 'step_00000002')
    assert again.returncode == 0, tail(again)
    keys = ('step', 'reason', 'ranks', 'checkpoint', 'skipped', 'skipped_images')
    assert [[e[k] for k in keys] for e in events(tmp_path, 'split')] == [[e[k] for k in keys] for e in (nan, spike)]
    assert_same_weights(final_state(tmp_path, 'healed'), final_state(tmp_path, 'split'))

    budget = run(tmp_path, 'budget', folder, 'train.max_steps=8', 'train.max_rollbacks=1')
    assert budget.returncode == 3, tail(budget)
    assert 'step 3: non-finite loss' in budget.stderr and 'step 5: loss spike' in budget.stderr, tail(budget)
    assert (tmp_path / 'budget' / 'checkpoints' / 'latest').read_text() == 'step_00000004'


@pytest.mark.dist
def test_two_ranks_zero2_roll_back_together_when_one_sees_the_nan(tmp_path, folder):
    """2 steps an epoch, a checkpoint every step. Epoch 0: rank 1 reads the inf image (global position 9: 9 % 2 = 1)
    at step 2; the same forward's all-gather and SyncBatchNorm carry the NaN into rank 0's loss too. Epoch 1: rank 1
    alone gets a NaN loss at step 3 (position 9 again), rank 0's loss is finite: both roll back together, or the
    ranks' collectives would part ways and the run would not finish. Then a resume on one rank from the checkpoint
    before both events: a global batch of 4 instead of 8, and still neither poisoned image is read again."""
    ds = write_ds(tmp_path, zero_optimization={'stage': 2})
    inf, nan = at(0, 9, world=2), at(1, 9, world=2)
    poison = f'inf:0:{inf},nan:1:{nan}'
    every = ('train.save_every_steps=1', 'train.keep_last=10')
    proc = run(tmp_path, 'two', folder, 'train.max_steps=4', *every, poison=poison, ranks=2, ds=ds)
    assert proc.returncode == 0, tail(proc)
    assert 'done: 4 steps' in proc.stdout, tail(proc)
    first, second = events(tmp_path, 'two')
    assert (first['step'], first['checkpoint'], first['skipped']) == (2, 'step_00000001', [[0, 8, 16]])
    assert 1 in first['ranks'] and inf in first['skipped_images']
    assert (second['step'], second['ranks'], second['checkpoint']) == (3, [1], 'step_00000002')
    assert second['skipped'] == [[1, 8, 16]] and nan in second['skipped_images']
    state = final_state(tmp_path, 'two')
    assert all(torch.isfinite(v).all() for v in state.values() if v.is_floating_point())

    one = run(tmp_path, 'two', folder, 'train.max_steps=6', *every, '--resume', 'step_00000001', poison=poison, ds=ds)
    assert one.returncode == 0 and 'done: 8 steps' in one.stdout, tail(one)
    assert 'global batch 8 -> 4' in one.stdout and len(events(tmp_path, 'two')) == 2, tail(one)


def test_finetuning_rolls_back_too(tmp_path):
    """Fine-tuning from scratch, 4 steps an epoch: the inf image at step 3 (epoch 0, positions 8-11)."""
    train = write_class_folder(tmp_path / 'train', [8, 8], seed=1)
    val = write_class_folder(tmp_path / 'val', [2, 2], seed=2)
    index = at(0, 9, seed=1)
    args = [
        SCRIPT,
        f'inf:0:{index}',
        'finetune',
        '--config',
        'finetune_debug',
        '--deepspeed_config',
        write_ds(tmp_path),
    ]
    args += ['model.size=debug', 'model.img_size=32', 'model.patch_size=8', 'finetune.pretrained=none']
    args += [f'data.root={train}', f'val_data.root={val}', 'data.num_workers=0', 'val_data.num_workers=0']
    args += ['finetune.progress_bar=false', 'finetune.seed=1', 'finetune.epochs=3', 'finetune.warmup_epochs=0']
    args += ['finetune.save_every_steps=2', 'finetune.max_steps=4', f'finetune.output_dir={tmp_path / "ft"}']
    proc = run_python(args)
    assert proc.returncode == 0, tail(proc)
    (event,) = events(tmp_path, 'ft')
    assert (event['step'], event['reason'], event['checkpoint']) == (3, 'non-finite loss', 'step_00000002')
    assert index in event['skipped_images']
    state = read_model_file(tmp_path / 'ft' / 'model_last.safetensors')['state_dict']
    assert all(torch.isfinite(v).all() for v in state.values() if v.is_floating_point())
