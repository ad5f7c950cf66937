"""Write failures: a save that cannot write removes its partial folder, leaves `latest` and the older checkpoints
intact and stops with one line naming the path, the error and the free space; an unwritable output folder is
refused before anything is built."""

from __future__ import annotations

import os
import shutil
import subprocess
from contextlib import contextmanager
from pathlib import Path

import pytest

from cmae_ds.engine.checkpoints import store as checkpointing
from cmae_ds.engine.checkpoints import verify as checkpoint_verify
from cmae_ds.storage.output_dir import OutputWriteError, check_output_dir, write_atomically

from engine_helpers import tail
from reliability_helpers import error_lines, marker, pretrain

STEP2, STEP4 = checkpointing.tag_for(2), checkpointing.tag_for(4)


def _assert_intact(run: Path, tag: str) -> None:
    ckpts = run / 'checkpoints'
    assert (ckpts / 'latest').read_text() == tag
    assert checkpointing.select_resume_tag('auto', ckpts, print) == tag
    assert checkpoint_verify.verify(ckpts, tag, marker(run, tag)['files']) is None
    assert not list(run.rglob('*.tmp'))


@pytest.mark.slow
def test_injected_enospc_during_save_removes_the_partial_checkpoint(tmp_path):
    run = tmp_path / 'run'
    proc = pretrain(tmp_path, run, 'train.max_steps=6', inject=f'{STEP4}/rank_state:ENOSPC')
    assert proc.returncode == 2, tail(proc)
    lines = error_lines(proc)
    assert len(lines) == 1 and 'Traceback' not in proc.stderr, proc.stderr
    rank_file = checkpointing.rank_file(run / 'checkpoints', STEP4, 0)
    assert lines[0].startswith(f'error: cannot write checkpoint file {rank_file}: No space left on device [ENOSPC]; ')
    assert ' free of ' in lines[0] and f'latest still names {STEP2}' in lines[0]
    # DeepSpeed's file was written before the rank file failed: the whole folder is gone
    assert not (run / 'checkpoints' / STEP4).exists()
    _assert_intact(run, STEP2)
    assert not (run / 'model.safetensors').exists()


@pytest.mark.slow
def test_model_file_write_failure_is_one_line_and_leaves_no_temporary(tmp_path):
    run = tmp_path / 'run'
    proc = pretrain(tmp_path, run, 'train.max_steps=2', inject='model.safetensors:EACCES')
    assert proc.returncode == 2, tail(proc)
    assert error_lines(proc)[0].startswith(
        f'error: cannot write model file {run / "model.safetensors"}: Permission denied [EACCES]; '
    )
    _assert_intact(run, STEP2)
    assert not (run / 'model.safetensors').exists() and not list(run.glob('*.tmp'))


def test_write_atomically_keeps_the_old_file(tmp_path):
    path = tmp_path / 'model.pt'
    path.write_bytes(b'old')

    def fails(f):
        f.write(b'half')
        raise OSError(28, os.strerror(28))

    with pytest.raises(
        OutputWriteError,
        match=r'cannot write model file .*model\.pt: No space left on device '
        r'\[ENOSPC\]; .* free of ',
    ):
        write_atomically(path, fails, 'model file')
    assert path.read_bytes() == b'old' and not list(tmp_path.glob('*.tmp'))


@contextmanager
def _mounted(where: Path, options: str):
    where.mkdir(parents=True, exist_ok=True)
    res = subprocess.run(['mount', '-t', 'tmpfs', '-o', options, 'tmpfs', str(where)], capture_output=True, text=True)
    if res.returncode != 0:
        pytest.skip(f'cannot mount a tmpfs here ({res.stderr.strip() or res.returncode}): needs root or CAP_SYS_ADMIN')
    try:
        yield where
    finally:
        subprocess.run(['umount', '-l', str(where)], check=False)


def _remount(where: Path, options: str) -> None:
    subprocess.run(['mount', '-o', f'remount,{options}', str(where)], check=True)


@pytest.mark.slow
def test_full_tmpfs_stops_cleanly_and_keeps_the_previous_checkpoint(tmp_path):
    with _mounted(tmp_path / 'mnt', 'size=256m') as mnt:
        run = mnt / 'run'
        first = pretrain(tmp_path, run, 'train.max_steps=2')
        assert first.returncode == 0, tail(first)
        size = checkpointing.newest_size(run / 'checkpoints')
        used = shutil.disk_usage(mnt).used
        # room for the start-up check (one checkpoint, at least 16 MiB) and a few more saves, then a full disk
        _remount(mnt, f'size={used + max(size, 16 << 20) + size // 2}')
        proc = pretrain(tmp_path, run, 'train.max_steps=100', 'train.save_every_steps=1', 'train.keep_last=100')
        assert proc.returncode == 2, tail(proc)
        lines = error_lines(proc)
        assert len(lines) == 1 and 'Traceback' not in proc.stderr, proc.stderr
        assert 'No space left on device [ENOSPC]' in lines[0] and ' free of ' in lines[0]
        failed = lines[0].split('cannot write checkpoint ')[1].split(':')[0]
        assert not Path(failed).exists()
        last = (run / 'checkpoints' / 'latest').read_text()
        assert f'latest still names {last}' in lines[0] and checkpointing._step_of(last) > 2
        _assert_intact(run, last)


@pytest.mark.slow
def test_read_only_output_folder_is_refused_before_anything_is_built(tmp_path):
    with _mounted(tmp_path / 'ro', 'size=1m,ro') as ro:
        for run, says in ((ro / 'new_run', 'cannot create the run folder'), (ro, 'the run folder is not writable')):
            proc = pretrain(tmp_path, run, 'train.max_steps=2')
            assert proc.returncode == 2, tail(proc)
            lines = error_lines(proc)
            assert len(lines) == 1 and lines[0].startswith(
                f'error: train.output_dir {run}: {says}: Read-only file system [EROFS]; '
            ), proc.stderr
            assert lines[0].endswith(' free of 1.0 MiB')
            out = proc.stdout + proc.stderr
            assert 'shm_comm_op' not in out and 'cmae_ds:' not in out  # not even the process group was started


def test_preflight_wants_room_for_a_checkpoint(tmp_path):
    free = shutil.disk_usage(tmp_path).free
    with pytest.raises(
        OutputWriteError,
        match=r'train.output_dir .*: only .* free on its file system, a checkpoint '
        r'needs about',
    ):
        check_output_dir(tmp_path / 'run', need_bytes=free * 2)
    check_output_dir(tmp_path / 'run2')
    assert (tmp_path / 'run2').is_dir() and not list((tmp_path / 'run2').iterdir())
