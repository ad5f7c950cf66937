"""Launchers besides `deepspeed`: torchrun, and tasks started as srun starts them (Slurm variables, no RANK), each
held to what the deepspeed launcher does (tests/test_preemption.py): one job of 2 ranks, a stop request ends every
rank with exit 75 and one checkpoint, and the run resumes from it.

Real launch/pretrain.py runs on the CPU (gloo) on real JPEG files; each test costs 25-60 s on a 2-core machine.
"""

import json
import random
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
from test_preemption import EXIT_PREEMPTED, args, wait_for_checkpoint

from engine_helpers import ROOT, env
from finetune_helpers import write_class_folder
from helpers import free_port

pytestmark = [pytest.mark.slow, pytest.mark.dist]
TORCHRUN = str(Path(sys.executable).parent / 'torchrun')
EPOCHS = 'train.epochs=6'  # 16 images, global batch 8: 12 steps, a checkpoint every 3


@pytest.fixture(scope='module')
def folder(tmp_path_factory):
    """16 real JPEG files in 2 classes."""
    return write_class_folder(tmp_path_factory.mktemp('imgs'), [8, 8])


def rank_processes(launcher: subprocess.Popen, n: int = 2, timeout: float = 600) -> dict[int, psutil.Process]:
    """The launcher's ranks by their RANK (torchrun passes it in the environment, not on the command line)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = {}
        for p in psutil.Process(launcher.pid).children(recursive=True):
            try:
                if 'launch/pretrain.py' in ' '.join(p.cmdline()) and 'RANK' in p.environ():
                    found[int(p.environ()['RANK'])] = p
            except psutil.Error:
                continue
        if len(found) == n:
            return found
        assert launcher.poll() is None, f'launcher exited {launcher.returncode}'
        time.sleep(0.2)
    raise AssertionError('ranks did not start')


def start_torchrun(tmp_path, folder, *torchrun_args, log='torchrun.log') -> subprocess.Popen:
    cmd = [TORCHRUN, '--nproc_per_node', '2', '--master_port', str(free_port()), *torchrun_args]
    cmd += args(tmp_path, 'run', folder, EPOCHS)
    with open(tmp_path / log, 'w') as out:  # a file: two chatty ranks could fill a pipe no one reads
        return subprocess.Popen(cmd, cwd=ROOT, env=env(), stdout=out, stderr=subprocess.STDOUT)


def read(tmp_path, log='torchrun.log') -> str:
    return (tmp_path / log).read_text(errors='replace')


def assert_one_checkpoint_for_both(run: Path, signal_names: dict) -> dict:
    note = json.loads((run / 'preempted.json').read_text())
    assert note['ranks'] == signal_names, note
    ckpts = run / 'checkpoints'
    assert note['checkpoint'].endswith((ckpts / 'latest').read_text())
    assert (Path(note['checkpoint']) / 'complete.json').is_file()
    return note


def test_torchrun_stop_of_one_rank_ends_both_and_max_restarts_resumes(tmp_path, folder):
    launcher = start_torchrun(tmp_path, folder, '--max-restarts', '1')
    ranks = rank_processes(launcher)
    wait_for_checkpoint(tmp_path / 'run', launcher)
    ranks[1].send_signal(signal.SIGUSR1)
    assert launcher.wait(timeout=600) == 0, read(tmp_path)[-3000:]
    out = read(tmp_path)
    assert not (tmp_path / 'run' / 'preempted.json').exists()  # cleared by the resume
    stopped = [line for line in out.splitlines() if line.startswith('preempted: SIGUSR1 (rank 1); stopped at step')]
    assert len(stopped) == 2, out[-3000:]  # both ranks took the exit-75 path
    assert 'failed (exitcode: 75)' in out  # torchrun saw the stop, restarted the group ...
    tag = stopped[0].split('checkpoints/')[1].split(';')[0]
    assert 'global batch 8, peak lr' in out and f'resumed from {tag}' in out  # ... which resumed from it
    assert (tmp_path / 'run' / 'model.safetensors').is_file()
    assert (tmp_path / 'run' / 'checkpoints' / 'latest').read_text() == 'step_00000012'


def test_sigterm_to_torchrun_stops_every_rank_with_one_checkpoint(tmp_path, folder):
    """What a cluster does to a job it preempts: SIGTERM to the launcher, which passes it on to its ranks."""
    launcher = start_torchrun(tmp_path, folder)
    rank_processes(launcher)
    wait_for_checkpoint(tmp_path / 'run', launcher)
    launcher.send_signal(signal.SIGTERM)
    assert launcher.wait(timeout=300) != 0  # torchrun itself reports the signal as a failure
    out = read(tmp_path)
    note = assert_one_checkpoint_for_both(tmp_path / 'run', {'0': 'SIGTERM', '1': 'SIGTERM'})
    assert out.count(f'stopped at step {note["step"]} with a complete checkpoint') == 2, out[-3000:]
    assert 'Unable to shutdown process' not in out  # no rank had to be killed


def slurm_job_id() -> int:
    """A job id whose derived port (cmae_ds/engine/slurm.py) is free here."""
    from cmae_ds.engine.slurm import PORT_BASE, PORT_SPAN

    for _ in range(100):
        job = random.randrange(10**5, 10**7)
        with socket.socket() as s:
            try:
                s.bind(('127.0.0.1', PORT_BASE + job % PORT_SPAN))
                return job
            except OSError:
                continue
    raise AssertionError('no free port for a simulated Slurm job')


def start_slurm_tasks(tmp_path, folder, job: int, attempt: int) -> list[subprocess.Popen]:
    """Two tasks as `srun --ntasks 2` starts them on one node: SLURM_* only, no RANK, WORLD_SIZE or MASTER_*."""
    tasks = []
    for procid in (0, 1):
        e = {
            k: v
            for k, v in env().items()
            if k not in ('RANK', 'WORLD_SIZE', 'LOCAL_RANK', 'MASTER_ADDR', 'MASTER_PORT')
        }
        e.update(  # a step's task (SchedMD/slurm src/common/env.c, env_array_for_step)
            SLURM_PROCID=str(procid),
            SLURM_LOCALID=str(procid),
            SLURM_NTASKS='2',
            SLURM_STEP_NUM_TASKS='2',
            SLURM_STEP_ID='0',
            SLURM_JOB_NODELIST='localhost',
            SLURM_STEP_NODELIST='localhost',
            SLURM_JOB_ID=str(job),
        )
        log = open(tmp_path / f'task{procid}.{attempt}.log', 'w')
        cmd = [sys.executable, *args(tmp_path, 'run', folder, EPOCHS)]
        tasks.append(subprocess.Popen(cmd, cwd=ROOT, env=e, stdout=log, stderr=subprocess.STDOUT))
    return tasks


def test_srun_tasks_form_one_job_stop_on_usr1_and_resume(tmp_path, folder):
    job = slurm_job_id()
    tasks = start_slurm_tasks(tmp_path, folder, job, 0)
    wait_for_checkpoint(tmp_path / 'run', tasks[0])
    for t in tasks:  # `sbatch --signal=USR1@120`: Slurm signals every task of the step
        t.send_signal(signal.SIGUSR1)
    codes = [t.wait(timeout=300) for t in tasks]
    logs = [read(tmp_path, f'task{r}.0.log') for r in (0, 1)]
    assert codes == [EXIT_PREEMPTED] * 2, logs[0][-2000:] + logs[1][-2000:]
    assert 'global batch 8,' in logs[0]  # one job of 2 ranks x micro-batch 4, not two jobs of 1
    assert_one_checkpoint_for_both(tmp_path / 'run', {'0': 'SIGUSR1', '1': 'SIGUSR1'})
    # the requeued job: the same tasks again
    tasks = start_slurm_tasks(tmp_path, folder, job, 1)
    codes = [t.wait(timeout=600) for t in tasks]
    logs = [read(tmp_path, f'task{r}.1.log') for r in (0, 1)]
    assert codes == [0, 0], logs[0][-2000:] + logs[1][-2000:]
    assert 'resumed from step_' in logs[0] and (tmp_path / 'run' / 'model.safetensors').is_file()
    assert (tmp_path / 'run' / 'checkpoints' / 'latest').read_text() == 'step_00000012'
