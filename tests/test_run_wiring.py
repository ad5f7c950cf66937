"""One short pretraining run through the real loop (debug CMAE, one rank, the real DeepSpeed engine on gloo, in this
process): the lr each parameter group stepped with and the momentum the EMA applied, read from the optimizer and the
weights at every step, equal the schedules of docs/spec.md; the accumulation boundaries; the TensorBoard scalars
read back with TensorBoard's own reader; the loss and a verified checkpoint. The everyday lane's end-to-end check."""

import math
import shutil

import pytest
import torch

from cmae_ds.engine.checkpoints.store import complete_tags, find_resume_tag
from cmae_ds.engine.checkpoints.verify import check_tag
from cmae_ds.engine.schedules import lr_at, momentum_at
from cmae_ds.modelfiles.model_file import read_model_file, run_model_file

from data_helpers import random_jpegs
from run_recorder import one_rank_group, run

PEAK = 0.05 * 8 / 256  # base_lr x global batch (1 rank x 4 x accumulation 2) / 256
STEPS, WARMUP = 8, 2


def expected_lr(k: int, peak: float = PEAK, total: int = STEPS, warmup: int = WARMUP) -> float:
    """The lr of the k-th optimizer step (0-based), written out: linear warm-up from 0.1 x peak to the peak at step
    warmup - 1 (mmengine's LinearLR), then the cosine."""
    if k < warmup:
        return peak * (0.1 + 0.9 * k / (warmup - 1))
    return 0.5 * peak * (1 + math.cos(math.pi * (k - warmup) / (total - warmup)))


def expected_momentum(s: int, total: int = STEPS) -> float:
    """Of the k-th optimizer step's EMA (docs/spec.md section 6), base 0.5 and end 0.9 as in run_recorder.ARGS."""
    return 0.9 - 0.4 * (math.cos(math.pi * s / total) + 1) / 2


@pytest.fixture(scope='module')
def images(tmp_path_factory):
    root = tmp_path_factory.mktemp('jpegs')
    random_jpegs(root, 16, size=(40, 44))
    return root


@pytest.fixture(scope='module')
def straight(tmp_path_factory, images):
    tmp = tmp_path_factory.mktemp('wiring')
    (tmp / 'images').symlink_to(images)
    with one_rank_group():
        yield tmp, run(tmp, images, 'run')


def test_schedule_helpers_agree_with_the_written_out_formulas():
    for k in range(STEPS + 1):
        assert lr_at(k, base_lr=PEAK, total_steps=STEPS, warmup_steps=WARMUP, warmup_start_factor=0.1) == pytest.approx(
            expected_lr(k)
        )
        assert momentum_at(k, total_steps=STEPS, m_base=0.5, m_end=0.9) == pytest.approx(expected_momentum(k))


def test_each_group_steps_with_the_scheduled_lr_through_warmup_and_cosine(straight):
    _, rec = straight
    assert len(rec.lrs) == STEPS
    for k, groups in enumerate(rec.lrs):
        assert len(groups) == 2  # decay and no decay
        for lr in groups:
            assert lr == pytest.approx(expected_lr(k), rel=1e-12, abs=1e-15), (k, groups)
    assert rec.lrs[0][0] == pytest.approx(PEAK * 0.1) and rec.lrs[1][0] == pytest.approx(PEAK)


def test_the_ema_applies_the_scheduled_momentum_after_every_step(straight):
    _, rec = straight
    assert sorted(rec.momenta) == list(range(1, STEPS + 1))
    for s, m in rec.momenta.items():
        assert m == pytest.approx(expected_momentum(s - 1), abs=2e-4), (s, m)


def test_the_optimizer_steps_once_per_accumulation_of_two_micro_steps(straight):
    _, rec = straight
    assert ''.join(rec.events) == 'ffs' * STEPS


def read_scalars(run_dir):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run_dir / 'tensorboard'), size_guidance={'scalars': 0}).Reload()
    return {tag.split('/', 1)[1]: {e.step: e.value for e in acc.Scalars(tag)} for tag in acc.Tags()['scalars']}


def test_tensorboard_holds_what_the_run_computed(straight):
    tmp, rec = straight
    logged = read_scalars(tmp / 'run')
    want = {'loss', 'loss_rec', 'loss_con', 'lr', 'momentum', 'grad_norm', 'images_per_s', 'data_wait_fraction'}
    assert want <= logged.keys(), sorted(logged)
    steps = list(range(1, STEPS + 1))
    for name in want | {'epoch'}:
        assert sorted(logged[name]) == steps, name
    for s in steps:
        micro = rec.losses[2 * (s - 1) : 2 * s]  # log_every_steps=1: the mean of the step's two micro-steps
        for key in ('loss', 'loss_rec', 'loss_con'):
            assert logged[key][s] == pytest.approx(sum(m[key] for m in micro) / 2, rel=1e-6), (key, s)
        assert logged['lr'][s] == pytest.approx(rec.lrs[s - 1][0], rel=1e-6), s  # the lr step s was taken with
        assert logged['momentum'][s] == pytest.approx(rec.momenta[s], abs=2e-4), s
        assert logged['grad_norm'][s] == pytest.approx(rec.grad_norms[s], rel=1e-6), s
        assert logged['epoch'][s] == pytest.approx(s / 2), s
        # images/s over the span between two log steps: that span starts before the previous step's observer call
        # and after its last forward, and ends after this step's last forward and before its observer call.
        elapsed = 8 / logged['images_per_s'][s]
        assert rec.forward_end[2 * s - 1] - rec.observed[s - 1] < elapsed, s
        if s > 1:  # the first span starts when the metrics are made, before the run's first observer call
            assert elapsed < rec.observed[s] - rec.forward_end[2 * s - 3], s
        assert 0 <= logged['data_wait_fraction'][s] < 1, s


def test_the_run_trains_and_leaves_a_verified_checkpoint(straight):
    tmp, rec = straight
    ckpts = tmp / 'run' / 'checkpoints'
    losses = [sum(m['loss'] for m in rec.losses[i : i + 2]) / 2 for i in range(0, 2 * STEPS, 2)]
    assert all(math.isfinite(v) for v in losses)
    assert losses[-1] < losses[0], losses
    assert rec.result.steps == STEPS and rec.result.checkpoint == ckpts / 'step_00000008'
    assert complete_tags(ckpts) == ['step_00000004', 'step_00000008'] and find_resume_tag(ckpts) == 'step_00000008'
    assert check_tag(ckpts, 'step_00000008', print) is None
    state = read_model_file(run_model_file(tmp / 'run'))['state_dict']
    assert all(torch.isfinite(v).all() for v in state.values() if v.is_floating_point())


def _resume(tmp, straight_dir, name: str):
    ckpts = tmp / name / 'checkpoints'
    shutil.copytree(straight_dir / 'checkpoints' / 'step_00000004', ckpts / 'step_00000004')
    (ckpts / 'latest').write_text('step_00000004')


def test_a_resume_continues_both_schedules(straight):
    tmp, _ = straight
    _resume(tmp, tmp / 'run', 'resumed')
    rec = run(tmp, tmp / 'images', 'resumed', 'train.max_steps=3')
    assert rec.start_step == 4 and len(rec.lrs) == 3
    for k, groups in enumerate(rec.lrs, start=4):
        assert groups == pytest.approx([expected_lr(k)] * 2, rel=1e-12), k
    assert sorted(rec.momenta) == [5, 6, 7]
    for s, m in rec.momenta.items():
        assert m == pytest.approx(expected_momentum(s - 1), abs=2e-4), (s, m)


def test_a_resume_with_another_global_batch_follows_the_new_schedule(straight):
    """Step 4 at a global batch of 8 (32 images, two epochs) resumed at 4 (accumulation 1): step 8 of 16, two of
    four steps per epoch now (so 4 of warm-up), and the peak lr scaled to the new batch."""
    tmp, _ = straight
    _resume(tmp, tmp / 'run', 'rebatched')
    rec = run(tmp, tmp / 'images', 'rebatched', 'train.max_steps=3', accum=1)
    assert rec.start_step == 8 and ''.join(rec.events) == 'fs' * 3
    for k, groups in enumerate(rec.lrs, start=8):
        assert groups == pytest.approx([expected_lr(k, peak=PEAK / 2, total=16, warmup=4)] * 2, rel=1e-12), k
    for s, m in rec.momenta.items():
        assert m == pytest.approx(expected_momentum(s - 1, total=16), abs=2e-4), (s, m)
    assert sorted(rec.momenta) == [9, 10, 11]
