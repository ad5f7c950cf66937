"""A rollback after a resume with a larger global batch (issue 31, item 5): the resize renumbers the steps downward
(engine/checkpoints/elastic.py), so the rollback chooses and deletes by write order (engine/guards/lineage.py), never
deletes the checkpoint the run resumed from, and a save whose tag a renumbered checkpoint holds keeps that one aside.
Real launch/pretrain.py: 2 ranks (deepspeed launcher, gloo), then 1 rank; the NaN comes from
tests/dist_scripts/poisoned_run.py (the real pipeline's images set to inf)."""

import json

import pytest
from test_rollback import IMAGES, at, run

from engine_helpers import tail, write_ds
from finetune_helpers import write_class_folder

pytestmark = [pytest.mark.slow, pytest.mark.dist]
EVERY_STEP = ('train.save_every_steps=1', 'train.keep_last=0')


@pytest.fixture
def images(tmp_path):
    return write_class_folder(tmp_path / 'imgs', [IMAGES // 2, IMAGES // 2])


def markers(ckpts):
    return {p.parent.name: json.loads(p.read_text()) for p in ckpts.glob('*/complete.json')}


def test_resize_to_one_rank_with_a_larger_batch_then_roll_back_keeps_every_good_checkpoint(tmp_path, images):
    """2 ranks x micro-batch 4 (global 8, 2 steps an epoch) write step_1-4; one rank with accumulation 4 (global 16,
    one step an epoch) resumes from step_4 as step 2. Its first step (epoch 2) reads an inf image: the newest
    checkpoint written before it is step_4, the resumed one, although its tag number is above the event's step 3.
    The old rule (marker step < 3) went to step_2 and deleted step_3 and step_4."""
    never = f'inf:9:{at(9, 0)}'  # the same script, no poison in the epochs these 4 steps read
    first = run(tmp_path, 'run', images, 'train.max_steps=4', *EVERY_STEP, poison=never, ranks=2)
    assert first.returncode == 0, tail(first)
    ckpts = tmp_path / 'run' / 'checkpoints'
    before = markers(ckpts)
    assert sorted(before) == [f'step_0000000{s}' for s in (1, 2, 3, 4)]

    big = write_ds(tmp_path, 'big.json', gradient_accumulation_steps=4)
    second = run(tmp_path, 'run', images, 'train.max_steps=2', *EVERY_STEP, poison=f'inf:2:{at(2, 5)}', ds=big)
    assert second.returncode == 0, tail(second)
    assert 'global batch 8 -> 16' in second.stdout, tail(second)
    (event,) = json.loads((tmp_path / 'run' / 'rollbacks.json').read_text())
    assert (event['step'], event['reason'], event['checkpoint']) == (3, 'non-finite loss', 'step_00000004')
    assert event['skipped'] == [[2, 0, IMAGES]]
    assert 'done: 4 steps' in second.stdout, tail(second)

    after = markers(ckpts)
    for tag, marker in before.items():  # every checkpoint of the 2-rank run is still there, as written
        kept = [name for name, m in after.items() if m['time'] == marker['time']]
        assert kept, (tag, sorted(after))
        assert kept[0] == tag or kept[0].startswith(f'{tag}.gb8-'), kept
    assert {'step_00000001', 'step_00000002'} <= set(after)
    # the run's own steps 3 and 4 (global batch 16) took the tags of the renumbered step_3 and step_4
    assert [after[t]['layout']['grad_accum'] for t in ('step_00000003', 'step_00000004')] == [4, 4]
    assert (ckpts / 'latest').read_text() == 'step_00000004'
