"""A stop signal while a rank waits for its peers ends it within seconds (issue 31, item 3; cmae_ds/engine/startup.py).

Real launch/pretrain.py processes started as rank 0 of 2 (RANK=0 WORLD_SIZE=2, as a launcher sets them) with no
second rank: each waits in torch's TCPStore for a peer that never comes. Once it listens on MASTER_PORT (it waits
from then on), one gets SIGINT, one SIGTERM and one SIGUSR1; each must end within a few seconds with one line, the
code that signal gives mid-run (75 for the scheduler's two, which the batch script requeues: launch/slurm/
pretrain.sbatch; 130 for Ctrl-C), and without leaving rank 0's run.lock. Before, the signals were turned into a
request for the next step, which never came: the process waited for the 30-minute collective timeout; then they
exited with 128 + the signal's number and left the lock, which a requeued job on another node could take over only
with --take-over-lock once its heartbeat was two minutes stale."""

import signal
import subprocess
import sys
import time

import psutil
import pytest

from cmae_ds.cli import EXIT_PREEMPTED
from cmae_ds.engine import dist, startup
from cmae_ds.engine.guards.run_lock import LOCK

from engine_helpers import ROOT, TINY, env, write_ds
from helpers import free_port


def waiting_rank0(tmp_path, name):
    port = free_port()
    e = {**env(), 'RANK': '0', 'WORLD_SIZE': '2', 'LOCAL_RANK': '0', 'MASTER_ADDR': '127.0.0.1'}
    e['MASTER_PORT'] = str(port)
    cmd = [sys.executable, 'launch/pretrain.py', '--deepspeed_config', write_ds(tmp_path, f'{name}.json'), *TINY]
    cmd += [f'train.output_dir={tmp_path / name}']
    proc = subprocess.Popen(cmd, cwd=ROOT, env=e, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    return proc, port


def wait_listening(proc, port, timeout=300):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, proc.communicate()
        try:
            ports = {c.laddr.port for c in psutil.Process(proc.pid).net_connections() if c.status == 'LISTEN'}
        except psutil.Error:
            ports = set()
        if port in ports:
            return
        time.sleep(0.2)
    raise AssertionError('rank 0 never listened for its peer')


@pytest.mark.slow
@pytest.mark.dist
def test_each_stop_signal_ends_a_rank_waiting_for_its_peer(tmp_path):
    codes = {signal.SIGINT: 130, signal.SIGTERM: EXIT_PREEMPTED, signal.SIGUSR1: EXIT_PREEMPTED}
    procs = {sig: waiting_rank0(tmp_path, sig.name) for sig in codes}
    try:
        for sig, (proc, port) in procs.items():
            lock = tmp_path / sig.name / LOCK
            signal_ends_it(proc, port, sig, codes[sig], lock)
            assert not lock.exists(), f'{sig.name}: run.lock left behind'
    finally:
        for proc, _ in procs.values():
            proc.kill() if proc.poll() is None else None


def signal_ends_it(proc, port, sig, code, lock):
    wait_listening(proc, port)
    time.sleep(1)  # well inside the wait
    assert lock.exists(), "rank 0 waits for its peer holding the run folder's lock"
    sent = time.monotonic()
    proc.send_signal(sig)
    try:
        _, err = proc.communicate(timeout=10)
    except subprocess.TimeoutExpired:
        proc.kill()
        raise AssertionError(f'{sig.name}: still waiting 10 s after the signal') from None
    took = time.monotonic() - sent
    assert proc.returncode == code, (sig.name, proc.returncode, err[-2000:])
    assert f'cmae_ds: {sig.name} during start-up (before the first step): exiting now with code {code}' in err, err
    assert took < 5, took


def test_an_in_process_group_leaves_signals_to_its_caller():
    """A notebook's or a test's own setup_distributed: once the group exists, Ctrl-C is theirs again (the guard
    ends with the group's forming; a run's start_run holds it until the first step)."""
    from run_recorder import one_rank_group

    with one_rank_group():
        dist.setup_distributed()
        assert not startup._active
        previous = signal.set_wakeup_fd(-1)
        signal.set_wakeup_fd(previous)
        assert previous == -1
