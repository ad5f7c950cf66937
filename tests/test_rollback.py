"""Runs that heal themselves: a poisoned image (inf pixels) and a finite loss spike, each rolled back to the newest
checkpoint before it with its data skipped; the budget; a resume from before a rollback; two ranks where only one sees
the NaN. Real launch/pretrain.py runs (debug model, real JPEGs); tests/dist_scripts/poisoned_run.py alters the
pipeline's and the model's outputs only."""

import json

import pytest
import torch
from PIL import Image
from test_engine import assert_same_weights, final_state

from cmae_ds.data.sampling import ShardPlan

from engine_helpers import TINY, run_deepspeed, run_python, tail, write_ds

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


def at(epoch: int, position: int, world: int = 1) -> int:
    """The dataset index at a global position of an epoch's order (seed 0, micro-batch 4)."""
    return int(ShardPlan(IMAGES, 4, world_size=world).epoch_order(epoch)[position])


# one rank, 4 images a step, 4 steps an epoch, checkpoints every 2 steps: the inf image is read at step 3 (epoch 0,
# positions 8-11: back to step 2, skip them); the spike at step 5 (epoch 1, positions 4-7: back to step 4)
INF, SPIKE = at(0, 9), at(1, 5)
POISON = f'inf:0:{INF},spike:1:{SPIKE}'


def run(tmp_path, name, folder, *extra, poison=POISON, ranks=1, ds=None):
    args = [
        SCRIPT,
        poison,
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
    """Rank 1 alone reads the inf image (global position 9 of epoch 0: 9 % 2 = 1), at step 2 of 2 per epoch."""
    ds = write_ds(tmp_path, zero_optimization={'stage': 2})
    index = at(0, 9, world=2)
    proc = run(
        tmp_path,
        'two',
        folder,
        'train.max_steps=4',
        'train.save_every_steps=1',
        poison=f'inf:0:{index}',
        ranks=2,
        ds=ds,
    )
    assert proc.returncode == 0, tail(proc)
    (event,) = events(tmp_path, 'two')
    assert (event['step'], event['ranks'], event['checkpoint'], event['skipped']) == (
        2,
        [1],
        'step_00000001',
        [[0, 8, 16]],
    )
    assert index in event['skipped_images']
    state = final_state(tmp_path, 'two')
    assert all(torch.isfinite(v).all() for v in state.values() if v.is_floating_point())
