"""Verified checkpoints: complete.json lists every file with its size and CRC-32; a resume finds a truncated,
deleted or altered file before loading, `--resume auto` falls back to the previous checkpoint naming the file, and
`--resume TAG` stops with one line naming it."""

from __future__ import annotations

import json
import zlib

import pytest
import torch

from cmae_ds.engine.checkpoints import store as checkpointing
from cmae_ds.engine.checkpoints import verify as checkpoint_verify
from cmae_ds.modelfiles.formats import CheckpointError

from engine_helpers import TINY, run_deepspeed, tail, write_ds
from helpers import model_state
from reliability_helpers import error_lines, marker, pretrain

STEP2, STEP4, STEP6 = (checkpointing.tag_for(s) for s in (2, 4, 6))


def _fake_checkpoint(ckpt_dir, tag, files: dict, listed: bool = True):
    """A checkpoint folder of plain files and its marker, as save() writes it on one rank."""
    tag_dir = ckpt_dir / tag
    tag_dir.mkdir(parents=True)
    for name, data in files.items():
        (tag_dir / name).parent.mkdir(parents=True, exist_ok=True)
        (tag_dir / name).write_bytes(data)
    entry = {'step': checkpointing._step_of(tag), 'tag': tag}
    if listed:
        entry.update(checksum='crc32', files=checkpoint_verify.checksums(tag_dir, [checkpoint_verify.sizes(tag_dir)]))
    (tag_dir / checkpointing.MARKER).write_text(json.dumps(entry))
    (ckpt_dir / checkpointing.POINTER).write_text(tag)


def test_manifest_entries_are_zlib_crc32_of_each_block(tmp_path, monkeypatch):
    monkeypatch.setattr(checkpoint_verify, 'BLOCK', 1 << 20)
    monkeypatch.setattr(checkpoint_verify, '_CHUNK', 300_000)  # chunks that do not divide a block
    data = bytes(range(256)) * 10_000  # 2.44 blocks
    _fake_checkpoint(tmp_path, STEP2, {'a.pt': data, 'sub/b.pt': b'xyz', 'empty.pt': b''})
    files = checkpoint_verify.manifest(tmp_path, STEP2)
    blocks = [data[i : i + (1 << 20)] for i in range(0, len(data), 1 << 20)]
    assert files == {
        'a.pt': {'size': len(data), 'crc32': [f'{zlib.crc32(b):08x}' for b in blocks]},
        'empty.pt': {'size': 0, 'crc32': [f'{zlib.crc32(b""):08x}']},
        'sub/b.pt': {'size': 3, 'crc32': [f'{zlib.crc32(b"xyz"):08x}']},
    }
    assert checkpoint_verify.verify(tmp_path, STEP2, files) is None


def test_same_size_corruption_is_found_by_the_checksum(tmp_path):
    _fake_checkpoint(tmp_path, STEP2, {'a.pt': b'\0' * 1000})
    _fake_checkpoint(tmp_path, STEP4, {'a.pt': b'\0' * 1000, 'b.pt': b'\1' * 1000})
    flipped = tmp_path / STEP4 / 'b.pt'
    flipped.write_bytes(b'\1' * 500 + b'\2' + b'\1' * 499)
    warnings = []
    assert checkpointing.select_resume_tag('auto', tmp_path, warnings.append) == STEP2
    assert len(warnings) == 1 and str(flipped) in warnings[0] and 'crc32' in warnings[0]
    assert STEP4 not in checkpointing.complete_tags(tmp_path)  # set aside: never resumed from, never pruned
    aside = [p.name for p in tmp_path.iterdir() if p.name.startswith(f'{STEP4}.damaged-')]
    assert len(aside) == 1 and (tmp_path / aside[0] / 'b.pt').is_file()


def test_nothing_intact_is_one_error_naming_every_checkpoint(tmp_path):
    _fake_checkpoint(tmp_path, STEP2, {'a.pt': b'12345'})
    _fake_checkpoint(tmp_path, STEP4, {'a.pt': b'12345'})
    (tmp_path / STEP2 / 'a.pt').write_bytes(b'12')
    (tmp_path / STEP4 / 'a.pt').unlink()
    with pytest.raises(CheckpointError, match='no checkpoint .* is intact') as e:
        checkpointing.select_resume_tag('auto', tmp_path, print)
    assert f'{tmp_path / STEP4 / "a.pt"} is missing' in str(e.value)
    assert f'{tmp_path / STEP2 / "a.pt"} has 2 bytes, 5 were written' in str(e.value)
    assert sorted(checkpointing.complete_tags(tmp_path)) == [STEP2, STEP4]  # nothing moved when nothing resumes


def test_checkpoints_without_a_file_list_resume_unverified_saying_so_once(tmp_path):
    _fake_checkpoint(tmp_path, STEP2, {'a.pt': b'1'}, listed=False)
    warnings = []
    assert checkpointing.select_resume_tag('auto', tmp_path, warnings.append) == STEP2
    assert len(warnings) == 1 and 'unverified' in warnings[0]


def _truncate(path):
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


@pytest.mark.slow
def test_damaged_newest_checkpoint_falls_back_and_resumes_exactly(tmp_path):
    straight = pretrain(tmp_path, tmp_path / 'straight', 'train.max_steps=6')
    assert straight.returncode == 0, tail(straight)
    run = tmp_path / 'run'
    first = pretrain(tmp_path, run, 'train.max_steps=4')
    assert first.returncode == 0, tail(first)
    ckpts = run / 'checkpoints'
    files = marker(run, STEP4)['files']
    # every file of the folder is listed (DeepSpeed's model and optimizer files, the rank file), with its size
    assert set(files) == {p.name for p in (ckpts / STEP4).iterdir() if p.name != 'complete.json'}
    assert {'mp_rank_00_model_states.pt', 'rank_state_00000.pt'} <= set(files)
    assert all(files[n]['size'] == (ckpts / STEP4 / n).stat().st_size for n in files)

    bad = ckpts / STEP4 / 'mp_rank_00_model_states.pt'
    _truncate(bad)
    tagged = pretrain(tmp_path, run, 'train.max_steps=2', '--resume', STEP4)
    assert tagged.returncode == 2, tail(tagged)
    assert error_lines(tagged) == [
        f'error: --resume {STEP4}: checkpoint {STEP4} is damaged: {bad} has '
        f'{bad.stat().st_size} bytes, {files[bad.name]["size"]} were written'
    ]
    assert 'Traceback' not in tagged.stderr

    resumed = pretrain(tmp_path, run, 'train.max_steps=4')
    assert resumed.returncode == 0, tail(resumed)
    out = resumed.stdout + resumed.stderr
    assert f'checkpoint {STEP4} is damaged ({bad} has' in out and f'resuming from {STEP2} instead' in out
    assert f'resumed from {STEP2}' in out
    # the fallback continues the run exactly: same weights as the run that was never damaged
    a = model_state(tmp_path / 'straight' / 'model.safetensors')
    b = model_state(run / 'model.safetensors')
    assert all(torch.equal(a[k], b[k]) for k in a)
    # step 4 was written again and verifies; the damaged copy is kept aside for inspection
    assert checkpoint_verify.verify(ckpts, STEP4, marker(run, STEP4)['files']) is None
    assert any(p.name.startswith(f'{STEP4}.damaged-') for p in ckpts.iterdir())


@pytest.mark.slow
def test_deleted_file_in_newest_checkpoint(tmp_path):
    run = tmp_path / 'run'
    first = pretrain(tmp_path, run, 'train.max_steps=4')
    assert first.returncode == 0, tail(first)
    gone = run / 'checkpoints' / STEP4 / 'rank_state_00000.pt'
    gone.unlink()
    tagged = pretrain(tmp_path, run, 'train.max_steps=2', '--resume', STEP4)
    assert tagged.returncode == 2 and error_lines(tagged) == [
        f'error: --resume {STEP4}: checkpoint {STEP4} is damaged: {gone} is missing'
    ], tail(tagged)
    resumed = pretrain(tmp_path, run, 'train.max_steps=2')
    assert resumed.returncode == 0, tail(resumed)
    assert f'checkpoint {STEP4} is damaged ({gone} is missing): resuming from {STEP2}' in resumed.stderr
    assert (run / 'checkpoints' / 'latest').read_text() == STEP4


@pytest.mark.slow
def test_two_ranks_list_each_others_files_and_fall_back_together(tmp_path):
    """ZeRO-2 on two CPU ranks: each rank writes its own optimizer shard and rank file; the marker lists them all,
    and a truncated shard of rank 1 sends both ranks back to the previous checkpoint."""
    ds = write_ds(tmp_path, zero_optimization={'stage': 2})
    run = tmp_path / 'run'
    args = [
        'launch/pretrain.py',
        '--deepspeed_config',
        ds,
        *TINY,
        'data.num_workers=0',
        'train.epochs=100',
        'train.save_every_steps=2',
        'train.keep_last=3',
        f'train.output_dir={run}',
    ]
    first = run_deepspeed([*args, 'train.max_steps=4'])
    assert first.returncode == 0, tail(first)
    files = marker(run, STEP4)['files']
    assert {
        'zero_pp_rank_0_mp_rank_00_optim_states.pt',
        'zero_pp_rank_1_mp_rank_00_optim_states.pt',
        'rank_state_00000.pt',
        'rank_state_00001.pt',
        'mp_rank_00_model_states.pt',
    } <= set(files)
    bad = run / 'checkpoints' / STEP4 / 'zero_pp_rank_1_mp_rank_00_optim_states.pt'
    data = bytearray(bad.read_bytes())
    data[len(data) // 2] ^= 0xFF  # same size: only the checksum can tell
    bad.write_bytes(bytes(data))
    resumed = run_deepspeed([*args, 'train.max_steps=2'])
    assert resumed.returncode == 0, tail(resumed)
    out = resumed.stdout + resumed.stderr
    assert out.count(f'checkpoint {STEP4} is damaged ({bad} does not match its crc32') == 1  # rank 0 warns
    assert f'resumed from {STEP2}' in out
