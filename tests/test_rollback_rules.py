"""The divergence detector and the skipped-data bookkeeping of rollbacks (fast, no engine)."""

import math

import numpy as np

from cmae_ds.data.pipelines.sampling import ShardPlan
from cmae_ds.engine.guards.divergence import DivergenceDetector, SpikeRule
from cmae_ds.engine.guards.skips import Layout, dataset_indices, first_unskipped, ranges_between


def detector(factor=3.0, window=4, steps=2, grad=0.0):
    return DivergenceDetector(SpikeRule(factor, window, steps), SpikeRule(grad, window, steps), {})


def feed(d, losses, norms=None, overflow=False):
    norms = norms or [None] * len(losses)
    return [d.observe(step, loss, norm, overflow) for step, (loss, norm) in enumerate(zip(losses, norms), 1)]


def test_non_finite_loss_or_norm_is_an_event_but_an_fp16_overflow_is_not():
    assert feed(detector(), [1.0, math.nan])[1].reason == 'non-finite loss'
    assert feed(detector(), [1.0, 1.0], [1.0, math.inf])[1].reason == 'non-finite gradient norm'
    assert feed(detector(), [1.0, 1.0], [1.0, math.inf], overflow=True) == [None, None]


def test_a_spike_needs_an_armed_window_and_consecutive_steps():
    # not armed: fewer than `window` healthy steps seen
    assert feed(detector(), [1.0, 1.0, 10.0, 10.0]) == [None] * 4
    # one spiking step alone is noise; two in a row are an event that began at the first
    verdicts = feed(detector(), [1.0, 1.1, 0.9, 1.0, 3.5, 1.0, 3.5, 3.6])
    assert verdicts[:7] == [None] * 7
    assert verdicts[7].reason.startswith('loss spike: 3.6 > 3 x median 1') and verdicts[7].first_step == 7
    # at the factor, not above it: no spike
    assert feed(detector(steps=1), [1.0, 1.0, 1.0, 1.0, 3.0]) == [None] * 5


def test_spiking_values_stay_out_of_the_median_and_a_falling_loss_never_fires():
    d = detector(steps=3)
    feed(d, [1.0] * 4 + [5.0, 5.0])
    assert d.state['losses'] == [1.0] * 4 and d.state['loss_run'] == 2
    assert feed(detector(steps=1), [10.0 / s for s in range(1, 50)]) == [None] * 49


def test_gradient_norm_spike_only_when_asked():
    norms = [1.0] * 4 + [50.0]
    assert feed(detector(steps=1), [1.0] * 5, norms)[-1] is None
    assert feed(detector(steps=1, grad=10.0), [1.0] * 5, norms)[-1].reason.startswith('gradient norm spike')


def test_ranges_split_at_epoch_ends_and_spill_over():
    layout = Layout(global_batch=8, steps_per_epoch=4)  # 32 images an epoch
    assert ranges_between((0, 16), (0, 24), layout) == [[0, 16, 24]]
    assert ranges_between((0, 24), (2, 8), layout) == [[0, 24, 32], [1, 0, 32], [2, 0, 8]]
    assert ranges_between((0, 24), (0, 40), layout) == [[0, 24, 32], [1, 0, 8]]
    assert ranges_between((1, 0), (1, 0), layout) == []


def test_the_first_unskipped_step_rounds_outwards_on_any_layout():
    ranges = [[0, 16, 24], [1, 0, 8]]
    same = Layout(8, 4)
    assert first_unskipped(ranges, 0, 1, same) == (0, 1)
    assert first_unskipped(ranges, 0, 2, same) == (0, 3)
    assert first_unskipped([[0, 16, 32], [1, 0, 8]], 0, 2, same) == (1, 1)
    # 12 images a step (another world size): step 1 (images 12-23) holds skipped ones, step 2 (24-35) none
    assert first_unskipped(ranges, 0, 1, Layout(12, 3)) == (0, 2)
    assert first_unskipped(ranges, 0, 0, Layout(12, 3)) == (0, 0)
    # with 2 steps an epoch, the next epoch's first step holds skipped images 0-7: the run starts at its second
    assert first_unskipped(ranges, 0, 1, Layout(12, 2)) == (1, 1)


def test_skipped_images_are_the_same_on_any_world_size():
    """Global position p of an epoch's order is read by rank p % W at its position p // W, whatever W is."""
    ranges = [[1, 8, 16]]
    for world in (1, 2, 4):
        plan = ShardPlan(32, 2, world_size=world)
        read = set()
        for rank in range(world):
            idx, _ = ShardPlan(32, 2, rank=rank, world_size=world).rank_indices(1)
            read.update(idx[8 // world : 16 // world].tolist())
        assert dataset_indices(plan, ranges) == sorted(read)
    assert len(np.unique(dataset_indices(ShardPlan(32, 2), [[1, 8, 16], [1, 12, 20]]))) == 12


def test_another_global_batch_keeps_the_steps_behind_the_skipped_data():
    """Elastic resume renumbers the step from the data position; the images skipped after rollbacks are not steps."""
    from cmae_ds.engine.checkpoints.elastic import Layout as Saved
    from cmae_ds.engine.checkpoints.elastic import carry_position

    # global batch 8 -> 12, 40 images into epoch 3; 24 images skipped earlier: 2 steps of 12 fewer than the data says
    p = {'epoch': 3, 'batch_in_epoch': 5, 'step': 26, 'data_ahead': 24}
    moved, _ = carry_position(p, Saved(2, 2, 4, 1), Saved(3, 2, 4, 1), steps_per_epoch=8)
    assert moved == {**p, 'batch_in_epoch': 4, 'step': 3 * 8 + 4 - 2}
