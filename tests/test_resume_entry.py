"""The one way into a resume, engine/checkpoints/resume.py: what `choose` and `plan` decide per case, in-process
and on checkpoint folders as store.save leaves them (marker with layout, model config and file list; DeepSpeed's
model states file where the decision reads it). The loads themselves are the real DeepSpeed engine's, tested end to
end in tests/test_elastic.py, tests/test_run_wiring.py and tests/test_preemption.py."""

from __future__ import annotations

import json
import os
from dataclasses import asdict
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from cmae_ds.config import ConfigError
from cmae_ds.engine.checkpoints import resume, store, verify
from cmae_ds.engine.checkpoints.elastic import ZERO1_FILES, Layout
from cmae_ds.modelfiles.safe_load import CheckpointError, UnsafeCheckpoint

from helpers import debug_cfg

MODEL = debug_cfg()
TWO_Z2 = Layout(2, 2, 4, 1, 'fp32')


def _checkpoint(ckpt_dir: Path, step: int, layout: Layout = TWO_Z2, optimizer=None, model=MODEL, extra=None) -> str:
    """A checkpoint as store.save leaves it: DeepSpeed's model states file (the optimizer in it on ZeRO-0), then
    the marker listing it with its checksums, and `latest` pointing at it."""
    tag = store.tag_for(step)
    tag_dir = ckpt_dir / tag
    tag_dir.mkdir(parents=True)
    torch.save({'module': {}, 'optimizer': optimizer, **(extra or {})}, tag_dir / ZERO1_FILES)
    files = verify.checksums(tag_dir, [verify.sizes(tag_dir)])
    store.mark_complete(ckpt_dir, tag, step, files, layout=asdict(layout), model=json.loads(json.dumps(asdict(model))))
    return tag


def _here(layout: Layout, form: str = 'plain', adam: bool = True) -> resume.Here:
    return resume.Here(layout, form, 'AdamW' if adam else 'LARS', adam)


def test_no_checkpoint_is_a_fresh_run_and_nothing_is_touched(tmp_path):
    assert resume.choose('auto', tmp_path / 'checkpoints') is None
    assert resume.choose('none', tmp_path / 'checkpoints') is None
    run = SimpleNamespace(ckpt_dir=tmp_path / 'checkpoints', ctx=None, trust=False)
    called = []
    # engine and model are never looked at: a fresh run starts from what the task built
    assert resume.restore(run, None, object(), object(), MODEL, 10, lambda *a: called.append(a)) is None
    assert called == []


def test_same_layout_loads_deepspeeds_own_files_at_the_same_position(tmp_path):
    tag = _checkpoint(tmp_path, 4)
    assert resume.choose('auto', tmp_path) == tag
    plan = resume.plan(tmp_path, tag, _here(TWO_Z2), MODEL)
    assert (plan.form, plan.change, plan.saved, plan.now) == (resume.DEEPSPEED, '', TWO_Z2, TWO_Z2)
    progress = {'epoch': 1, 'batch_in_epoch': 6, 'step': 16}
    assert plan.position(progress, steps_per_epoch=10) == (progress, None)


def test_zero0_on_another_world_size_loads_as_it_is(tmp_path):
    """Every ZeRO-0 rank saved and loads the whole optimizer state."""
    tag = _checkpoint(tmp_path, 4, Layout(2, 0, 4, 1, 'fp32'), optimizer={'state': {}, 'param_groups': []})
    plan = resume.plan(tmp_path, tag, _here(Layout(1, 0, 4, 2, 'fp32')), MODEL)
    assert plan.form == resume.DEEPSPEED
    assert plan.position({'epoch': 0, 'batch_in_epoch': 3, 'step': 3}, 10) == (
        {'epoch': 0, 'batch_in_epoch': 6, 'step': 3},  # the same image: 3 micro-steps of 8 are 6 of 4
        None,
    )


def test_another_world_size_goes_through_the_universal_form_and_carries_the_position(tmp_path):
    tag = _checkpoint(tmp_path, 4)
    one = Layout(1, 2, 4, 2, 'fp32')  # the same global batch, 8
    plan = resume.plan(tmp_path, tag, _here(one), MODEL)
    assert (plan.form, plan.saved, plan.now) == (resume.UNIVERSAL, TWO_Z2, one)
    assert plan.position({'epoch': 0, 'batch_in_epoch': 2, 'step': 2}, 10) == (
        {'epoch': 0, 'batch_in_epoch': 4, 'step': 2},
        None,
    )
    moved, note = resume.plan(tmp_path, tag, _here(Layout(3, 2, 4, 1, 'fp32')), MODEL).position(
        {'epoch': 0, 'batch_in_epoch': 2, 'step': 2}, 10
    )
    assert moved['batch_in_epoch'] == 2 and 'global batch 8 -> 12' in note  # image 16 -> the boundary at 24


@pytest.mark.parametrize(
    'saved,now,form',
    [
        (Layout(1, 3, 4, 1, 'fp32'), Layout(1, 0, 4, 1, 'fp32'), resume.UNIVERSAL_ZERO0),
        (Layout(1, 0, 4, 1, 'fp32'), Layout(1, 2, 4, 1, 'fp32'), resume.UNIVERSAL),
        (Layout(1, 2, 4, 1, 'fp32'), Layout(1, 2, 4, 1, 'bf16'), resume.UNIVERSAL),
        (Layout(1, 0, 4, 1, 'fp32'), Layout(1, 0, 4, 1, 'bf16'), resume.UNIVERSAL_ZERO0),
    ],
    ids=['zero3-to-zero0', 'zero0-to-zero2', 'fp32-to-bf16', 'zero0-fp32-to-bf16'],
)
def test_another_zero_stage_or_precision_goes_through_the_universal_form(tmp_path, saved, now, form):
    optimizer = {'state': {}, 'param_groups': []} if saved.zero_stage == 0 else None
    tag = _checkpoint(tmp_path, 4, saved, optimizer=optimizer)
    plan = resume.plan(tmp_path, tag, _here(now), MODEL)
    assert (plan.form, plan.saved, plan.now) == (form, saved, now)
    assert plan.describe() == f'written by {saved.describe()}, resumed on {now.describe()}'


def test_zero0_in_another_optimizer_form_goes_through_the_universal_form(tmp_path):
    bf16 = Layout(1, 0, 4, 1, 'bf16')
    tag = _checkpoint(tmp_path, 4, bf16, optimizer={'fp32_groups_flat': [torch.zeros(3)]})  # FusedAdam's form
    plan = resume.plan(tmp_path, tag, _here(bf16, form='copies'), MODEL)
    assert (plan.form, plan.change) == (resume.UNIVERSAL_ZERO0, ' (optimizer form flat, here copies)')
    assert resume.plan(tmp_path, tag, _here(bf16, form='flat'), MODEL).form == resume.DEEPSPEED


def test_what_cannot_resume_stops_before_anything_is_loaded(tmp_path):
    tag = _checkpoint(tmp_path, 4)
    with pytest.raises(ConfigError, match="LARS run on another layout .* Adam's moments only"):
        resume.plan(tmp_path, tag, _here(Layout(1, 2, 4, 2, 'fp32'), adam=False), MODEL)
    assert resume.plan(tmp_path, tag, _here(TWO_Z2, adam=False), MODEL).form == resume.DEEPSPEED
    with pytest.raises(ConfigError, match='model.depth=.* there, .* here'):
        resume.plan(tmp_path, tag, _here(TWO_Z2), debug_cfg(depth=MODEL.depth + 1))


def test_a_damaged_checkpoint_is_passed_over_or_refused(tmp_path):
    older = _checkpoint(tmp_path, 2)
    newer = _checkpoint(tmp_path, 4)
    path = tmp_path / newer / ZERO1_FILES
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 1  # one bit, same size: only the checksum sees it
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=f'--resume {newer}: checkpoint {newer} is damaged'):
        resume.choose(newer, tmp_path, log=lambda m: None)
    said = []
    assert resume.choose('auto', tmp_path, log=said.append) == older
    assert any(f'checkpoint {newer} is damaged' in m for m in said)
    assert [p.name.split('.')[0] for p in tmp_path.iterdir() if '.damaged-' in p.name] == [newer]


def test_an_untrusted_checkpoint_is_refused_unless_the_run_trusts_it(tmp_path):
    """A file that would import and call os.system when unpickled: refused by choose (before anything is built)
    and by plan (which opens the states file), read when the run trusts it."""
    saved, now = Layout(1, 0, 4, 1, 'bf16'), Layout(1, 0, 4, 1, 'bf16')
    tag = _checkpoint(tmp_path, 4, saved, optimizer={'fp32_groups_flat': []}, extra={'hook': os.system})
    with pytest.raises(UnsafeCheckpoint, match='system'):
        resume.choose('auto', tmp_path)
    with pytest.raises(UnsafeCheckpoint, match='system'):
        resume.plan(tmp_path, tag, _here(now), MODEL)
    assert resume.choose('auto', tmp_path, trust=True) == tag
    plan = resume.plan(tmp_path, tag, _here(now, form='flat'), MODEL, trust=True)
    assert (plan.form, plan.trust) == (resume.DEEPSPEED, True)
