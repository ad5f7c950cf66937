"""Which checkpoints a rollback may return to and delete (cmae_ds/engine/guards/lineage.py), by write order (fast,
markers only). A resume with a larger global batch renumbers the steps downward (engine/checkpoints/elastic.py):
the tags written before it can carry larger numbers than every one the resumed run writes."""

import json

from cmae_ds.engine.guards.lineage import Lineage


def mark(ckpt_dir, step, written):
    tag = ckpt_dir / f'step_{step:08d}'
    tag.mkdir(parents=True, exist_ok=True)
    (tag / 'complete.json').write_text(json.dumps({'step': step, 'tag': tag.name, 'time': written, 'files': {}}))
    return tag.name


def test_after_a_resize_the_resumed_checkpoint_and_those_before_it_are_targets_and_never_deleted(tmp_path):
    ckpts = tmp_path / 'checkpoints'
    old = [mark(ckpts, 10, 1.0), mark(ckpts, 20, 2.0)]  # global batch 8
    lineage = Lineage.at_start(ckpts, 'step_00000020')  # resumed at global batch 16: step 10 now
    own = [mark(ckpts, 12, 3.0), mark(ckpts, 14, 4.0)]
    assert lineage.before(11) == old  # an event at step 11: back to step_20, the newest written before it
    assert lineage.after(11) == own
    assert lineage.before(13) == [*old, own[0]] and lineage.after(13) == [own[1]]


def test_checkpoints_of_a_timeline_the_run_left_are_neither_targets_nor_deleted(tmp_path):
    ckpts = tmp_path / 'checkpoints'
    mark(ckpts, 10, 1.0), mark(ckpts, 20, 2.0)
    lineage = Lineage.at_start(ckpts, 'step_00000010')  # --resume step_00000010 with step_20 on disk
    mark(ckpts, 12, 3.0)
    assert lineage.before(15) == ['step_00000010', 'step_00000012']
    assert lineage.after(11) == ['step_00000012']


def test_a_tag_the_run_rewrote_is_its_own_and_a_pruned_one_is_gone(tmp_path):
    ckpts = tmp_path / 'checkpoints'
    mark(ckpts, 4, 1.0), mark(ckpts, 8, 2.0)
    lineage = Lineage.at_start(ckpts, 'step_00000008')
    mark(ckpts, 4, 3.0)  # the resized run's own step 4, written over the name (and kept aside by store.save)
    assert lineage.before(4) == ['step_00000008'] and lineage.after(4) == ['step_00000004']
    assert Lineage.at_start(tmp_path / 'none', None).before(5) == []
