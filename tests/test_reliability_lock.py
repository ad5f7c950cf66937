"""One writer per run folder: a second run refuses naming the holder; a gone holder's lock is taken over (at once
on this machine, with --take-over-lock once its heartbeat is stale from another); the lock goes with the run."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time

import pytest

from cmae_ds.engine.guards import run_lock
from cmae_ds.engine.guards.run_lock import LOCK, RunLock, RunLockedError

from engine_helpers import ROOT, env, tail
from reliability_helpers import error_lines, pretrain


def _plant(run_dir, **fields):
    """A lock file as another holder left it."""
    now = time.time()
    holder = dict(
        host='elsewhere',
        boot_id='another-boot',
        pid=4242,
        proc_start=1,
        started=now - 3600,
        heartbeat=now,
        command='launch/pretrain.py',
        token='theirs',
    )
    holder.update(fields)
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / LOCK).write_text(json.dumps(holder))
    return holder


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, '-c', 'pass'])
    proc.wait()
    return proc.pid


def test_second_holder_is_refused_naming_the_first(tmp_path):
    first, warnings = RunLock(tmp_path), []
    first.acquire()
    try:
        with pytest.raises(
            RunLockedError,
            match=rf'{tmp_path} is in use by another run: pid {os.getpid()} on '
            rf'{socket.gethostname()}, started .* heartbeat \d+ s ago',
        ):
            RunLock(tmp_path, log=warnings.append).acquire(take_over=True)  # live here: never taken over
    finally:
        first.release()
    assert not (tmp_path / LOCK).exists() and not warnings


def test_lock_of_an_exited_process_on_this_machine_is_taken_over(tmp_path):
    _plant(tmp_path, host=socket.gethostname(), boot_id=run_lock._boot_id(), pid=_dead_pid(), token='dead')
    warnings = []
    lock = RunLock(tmp_path, log=warnings.append)
    lock.acquire()
    try:
        assert json.loads((tmp_path / LOCK).read_text())['pid'] == os.getpid()
        assert len(warnings) == 1 and 'has exited' in warnings[0]
    finally:
        lock.release()


def test_reused_pid_is_not_the_holder(tmp_path):
    _plant(tmp_path, host=socket.gethostname(), boot_id=run_lock._boot_id(), pid=os.getpid(), proc_start=1)
    lock = RunLock(tmp_path, log=lambda msg: None)
    lock.acquire()  # our own pid, but a process started at another time wrote the lock
    lock.release()


def test_other_machine_needs_the_flag_and_a_stale_heartbeat(tmp_path):
    _plant(tmp_path, heartbeat=time.time() - 1000)
    with pytest.raises(RunLockedError, match=r'pid 4242 on elsewhere, .* heartbeat 1000 s ago .*--take-over-lock'):
        RunLock(tmp_path).acquire()
    warnings = []
    lock = RunLock(tmp_path, log=warnings.append)
    lock.acquire(take_over=True)
    lock.release()
    assert 'taking over the lock' in warnings[0] and 'pid 4242 on elsewhere' in warnings[0]


def test_take_over_waits_for_a_fresh_heartbeat_to_go_stale(tmp_path):
    _plant(tmp_path)  # fresh heartbeat from another machine: a requeued job whose old node just died
    lock = RunLock(tmp_path, heartbeat_s=0.1, stale_after_s=1.0, log=lambda msg: None)
    t0 = time.monotonic()
    lock.acquire(take_over=True)
    lock.release()
    assert 0.9 < time.monotonic() - t0 < 5


def test_take_over_refuses_a_holder_that_keeps_beating(tmp_path):
    holder = _plant(tmp_path)
    stop = threading.Event()

    def beat():  # the other machine's heartbeat thread
        while not stop.wait(0.1):
            holder['heartbeat'] = time.time()
            (tmp_path / LOCK).write_text(json.dumps(holder))

    thread = threading.Thread(target=beat)
    thread.start()
    try:
        with pytest.raises(RunLockedError, match='still beating'):
            RunLock(tmp_path, heartbeat_s=0.1, stale_after_s=1.0).acquire(take_over=True)
    finally:
        stop.set()
        thread.join()
    assert json.loads((tmp_path / LOCK).read_text())['token'] == 'theirs'


def test_heartbeat_advances_and_release_removes_only_our_lock(tmp_path):
    lock = RunLock(tmp_path, heartbeat_s=0.05)
    lock.acquire()
    first = json.loads((tmp_path / LOCK).read_text())['heartbeat']
    time.sleep(0.3)
    assert json.loads((tmp_path / LOCK).read_text())['heartbeat'] > first
    lock.release()
    assert not (tmp_path / LOCK).exists()


def test_guard_releases_on_exceptions_and_only_rank0_locks(tmp_path, monkeypatch):
    with pytest.raises(ZeroDivisionError):
        with run_lock.guard(tmp_path / 'run'):
            assert (tmp_path / 'run' / LOCK).is_file()
            raise ZeroDivisionError
    assert not (tmp_path / 'run' / LOCK).exists()
    monkeypatch.setenv('RANK', '1')
    with run_lock.guard(tmp_path / 'run'):
        assert not (tmp_path / 'run' / LOCK).exists()  # the other ranks trust rank 0's lock


@pytest.mark.slow
def test_two_writers_in_one_run_folder(tmp_path):
    run = tmp_path / 'run'
    # a long first run; the second starts once the first holds the lock
    first = subprocess.Popen(
        [
            sys.executable,
            'launch/pretrain.py',
            '--deepspeed_config',
            str(ROOT / 'ds_configs' / 'cpu_debug.json'),
            'model.size=debug',
            'model.img_size=32',
            'model.patch_size=8',
            'model.decoder_depth=1',
            'train.progress_bar=false',
            'data.source=synthetic',
            'data.num_workers=0',
            'train.max_steps=100000',
            'train.save_every_steps=2',
            f'train.output_dir={run}',
        ],
        cwd=ROOT,
        env=env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 300
        while not (run / 'checkpoints' / 'latest').exists():
            assert first.poll() is None and time.monotonic() < deadline
            time.sleep(0.5)
        second = pretrain(tmp_path, run, 'train.max_steps=2')
        assert second.returncode == 2, tail(second)
        assert error_lines(second) == [
            f'error: {run} is in use by another run: pid {first.pid} on {socket.gethostname()}, started '
            + error_lines(second)[0].split(', started ')[1]
        ]
        assert 'stop that run or choose another output folder' in second.stderr
        refused = pretrain(tmp_path, run, 'train.max_steps=2', '--take-over-lock')
        assert refused.returncode == 2 and 'is in use by another run' in refused.stderr  # live here
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait()
    # killed: its lock stays, but its process is gone, so the next run takes over and resumes
    assert (run / LOCK).exists()
    third = pretrain(tmp_path, run, 'train.max_steps=2')
    assert third.returncode == 0, tail(third)
    assert (
        f'its holder (pid {first.pid} on {socket.gethostname()}' in third.stderr
        and 'resumed from' in third.stdout + third.stderr
    )
    assert not (run / LOCK).exists()
