"""Preemption, a dead launcher and a frozen peer, on real runs of launch/pretrain.py (CPU, gloo).

A run stopped by SIGTERM, SIGINT or SIGUSR1 writes a complete checkpoint and exits 75; resumed, it ends with the
same weights as a run that was never interrupted. A frozen rank makes its peer's watchdog end the job.
"""

import json
import random
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import psutil
import pytest
import torch

from cmae_ds.modelfiles.model_file import RUN_MODEL

from engine_helpers import DEEPSPEED, ROOT, TINY, env, write_ds
from helpers import free_port, model_state

pytestmark = pytest.mark.slow
EXIT_PREEMPTED = 75


def args(tmp_path, run, folder, *extra):
    return [
        'launch/pretrain.py',
        '--deepspeed_config',
        write_ds(tmp_path),
        *TINY,
        'data.source=folder',
        f'data.root={folder}',
        'data.pipeline=torch',
        'data.num_workers=0',
        'train.epochs=40',  # 160 steps: long enough to be interrupted mid-run
        'train.warmup_epochs=1',
        'train.save_every_steps=3',
        'train.keep_last=2',
        f'train.output_dir={tmp_path / run}',
        *extra,
    ]


def start(cmd: list) -> subprocess.Popen:
    return subprocess.Popen(cmd, cwd=ROOT, env=env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def wait_for(path: Path, proc: subprocess.Popen, timeout: float = 600) -> None:
    """Until `path` exists (training has reached a step), failing early if the run ended."""
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert proc.poll() is None, proc.stdout.read()[-3000:] if proc.stdout else f'exit {proc.returncode}'
        assert time.monotonic() < deadline, f'{path} did not appear'
        time.sleep(0.05)


def wait_for_checkpoint(run_dir: Path, proc: subprocess.Popen) -> None:
    """Until the run has a complete checkpoint (`latest` is written only then, atomically)."""
    wait_for(run_dir / 'checkpoints' / 'latest', proc)


def finish(proc: subprocess.Popen, timeout: float = 600) -> tuple[int, str]:
    out, _ = proc.communicate(timeout=timeout)
    return proc.returncode, out


def model(tmp_path, run) -> dict:
    return model_state(tmp_path / run / 'model.safetensors')


def assert_bit_identical(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


@pytest.fixture(scope='module')
def folder(tmp_path_factory):
    from PIL import Image

    root = tmp_path_factory.mktemp('imgs')
    gen = torch.Generator().manual_seed(0)
    for i in range(16):
        d = root / f'class_{i % 2}'
        d.mkdir(exist_ok=True)
        pixels = torch.randint(0, 256, (40 + i, 44 + i, 3), generator=gen, dtype=torch.uint8).numpy()
        Image.fromarray(pixels).save(d / f'img_{i}.jpg', quality=90)
    return root


@pytest.fixture(scope='module')
def straight(tmp_path_factory, folder):
    """The uninterrupted run every interrupted one is compared with."""
    tmp = tmp_path_factory.mktemp('straight')
    rc, out = finish(start([sys.executable, *args(tmp, 'run', folder)]))
    assert rc == 0, out[-3000:]
    return SimpleNamespace(state=model(tmp, 'run'), run_dir=tmp / 'run')


@pytest.mark.parametrize('sig', [signal.SIGTERM, signal.SIGINT, signal.SIGUSR1])
def test_signal_saves_a_checkpoint_exits_75_and_resumes_exactly(tmp_path, folder, straight, sig):
    proc = start([sys.executable, *args(tmp_path, 'run', folder)])
    wait_for_checkpoint(tmp_path / 'run', proc)
    proc.send_signal(sig)
    rc, out = finish(proc)
    assert rc == EXIT_PREEMPTED, out[-3000:]
    assert 'Traceback' not in out and 'preempted:' in out
    note = (tmp_path / 'run' / 'preempted.json').read_text()
    assert signal.Signals(sig).name in note
    rc, out = finish(start([sys.executable, *args(tmp_path, 'run', folder)]))
    assert rc == 0, out[-3000:]
    assert not (tmp_path / 'run' / 'preempted.json').exists()
    assert_bit_identical(model(tmp_path, 'run'), straight.state)


SECOND_SIGINT = """
import os, signal, sys, time
from cmae_ds.engine.guards.preemption import StopRequests
stop = StopRequests().install()
os.kill(os.getpid(), signal.SIGINT)
time.sleep(0.2)  # the first is handled (Python runs one handler for signals that arrive together)
print('first:', stop.reason, flush=True)
os.kill(os.getpid(), signal.SIGINT)
time.sleep(5)
print('still running', flush=True)
"""


def test_second_sigint_exits_at_once():
    proc = subprocess.run(
        [sys.executable, '-c', SECOND_SIGINT], cwd=ROOT, env=env(), capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 130, proc.stdout + proc.stderr
    assert 'first: SIGINT' in proc.stdout and 'still running' not in proc.stdout
    assert 'second SIGINT' in proc.stderr and 'Traceback' not in proc.stderr


def test_a_second_sigint_during_the_stop_leaves_a_complete_resume_point(tmp_path, folder):
    """Wherever the second SIGINT lands (the step, the save, the exit), `latest` names a complete checkpoint."""
    proc = start([sys.executable, *args(tmp_path, 'run', folder)])
    wait_for_checkpoint(tmp_path / 'run', proc)
    proc.send_signal(signal.SIGINT)
    for line in proc.stdout:
        if 'stopping after the current optimizer step' in line:
            break
    proc.send_signal(signal.SIGINT)
    rc, out = finish(proc, timeout=120)
    assert rc in (130, EXIT_PREEMPTED), out[-3000:]
    assert 'Traceback' not in out
    ckpts = tmp_path / 'run' / 'checkpoints'
    latest = (ckpts / 'latest').read_text()
    assert (ckpts / latest / 'complete.json').exists()
    rc, out = finish(start([sys.executable, *args(tmp_path, 'run', folder, 'train.max_steps=2')]))
    assert rc == 0 and f'resumed from {latest}' in out, out[-3000:]


def test_chaos_kill_term_int_at_random_steps_ends_bit_identical(tmp_path, folder, straight):
    """Seeded rounds of SIGKILL, SIGTERM and SIGINT at random moments of a step (each after a new checkpoint, so
    mid-run: the run has 160 steps, the rounds take a few each); each time the same command resumes. Every round
    must have interrupted the run: cut off (SIGKILL) or stopped with a checkpoint (75), no model file yet."""
    rng = random.Random(1234)
    run_dir, rounds = tmp_path / 'run', (signal.SIGKILL, signal.SIGTERM, signal.SIGINT, signal.SIGKILL, signal.SIGTERM)
    interrupted = 0
    for sig in rounds:
        pointer = run_dir / 'checkpoints' / 'latest'
        before = pointer.read_text() if pointer.exists() else None
        proc = start([sys.executable, *args(tmp_path, 'run', folder)])
        wait_for_new_checkpoint(pointer, before, proc)
        time.sleep(rng.uniform(0.0, 0.5))
        proc.send_signal(sig)
        rc, out = finish(proc)
        assert rc in (-sig, EXIT_PREEMPTED), out[-3000:]
        interrupted += not (run_dir / RUN_MODEL).exists()
    assert interrupted == len(rounds)
    rc, out = finish(start([sys.executable, *args(tmp_path, 'run', folder)]))
    assert rc == 0, out[-3000:]
    assert_bit_identical(model(tmp_path, 'run'), straight.state)


def wait_for_new_checkpoint(pointer: Path, before, proc: subprocess.Popen, timeout: float = 600) -> None:
    """Until `latest` names another checkpoint than `before` (the run has taken steps since it started)."""
    deadline = time.monotonic() + timeout
    while not pointer.exists() or pointer.read_text() == before:
        assert proc.poll() is None, proc.stdout.read()[-3000:] if proc.stdout else f'exit {proc.returncode}'
        assert time.monotonic() < deadline, f'{pointer} did not move'
        time.sleep(0.05)


@pytest.mark.dist
@pytest.mark.parametrize('target', ['runner', 'launch.py'])
def test_a_signalled_launcher_leaves_one_checkpoint_every_rank_saved(tmp_path, folder, target):
    """SIGTERM to the launcher, not to a rank. The `deepspeed` runner has no handler on one node: it dies of the
    signal at once (-15; 143 in a shell), and the ranks, seeing it gone, stop together and save. Its child
    deepspeed.launcher.launch passes the signal to the ranks, which save, and then exits 1, which the runner
    returns. Either way: one complete checkpoint holding both ranks' files, preempted.json naming it."""
    launcher = launch_two_ranks(tmp_path, folder)
    ranks = _ranks(launcher)
    wait_for_checkpoint(tmp_path / 'run', launcher)
    if target == 'runner':
        launcher.send_signal(signal.SIGTERM)
    else:
        [middle] = [p for p in psutil.Process(launcher.pid).children() if 'deepspeed.launcher.launch' in p.cmdline()]
        middle.send_signal(signal.SIGTERM)
    rc = launcher.wait(timeout=300)
    _, alive = psutil.wait_procs(ranks, timeout=300)
    assert not alive, launcher_output(tmp_path)
    assert rc == (-signal.SIGTERM if target == 'runner' else 1), launcher_output(tmp_path)
    note = json.loads((tmp_path / 'run' / 'preempted.json').read_text())
    saved = Path(note['checkpoint'])
    assert (saved / 'complete.json').is_file() and (
        tmp_path / 'run' / 'checkpoints' / 'latest'
    ).read_text() == saved.name
    assert sorted(p.name for p in saved.glob('rank_state_*.pt')) == ['rank_state_00000.pt', 'rank_state_00001.pt']
    assert {p.name for p in saved.glob('zero_pp_rank_*_optim_states.pt')} == {
        'zero_pp_rank_0_mp_rank_00_optim_states.pt',
        'zero_pp_rank_1_mp_rank_00_optim_states.pt',
    }
    # the rank that noticed first names the reason; the other joins the agreed stop as its peer
    reason = 'launcher process' if target == 'runner' else 'SIGTERM'
    assert note['ranks'] and all(reason in why for why in note['ranks'].values()), note


@pytest.mark.parametrize('task', ['finetune', 'linprobe'])
def test_classification_runs_stop_with_a_checkpoint_and_resume(tmp_path, folder, pretrained_run, task):
    """Fine-tuning and probing share the loop: SIGTERM after the first epoch's checkpoint -> 75 -> resume -> done."""
    config = 'finetune_debug' if task == 'finetune' else 'linprobe_vit_base'
    cmd = [
        sys.executable,
        f'launch/{"finetune" if task == "finetune" else "linear_probe"}.py',
        '--config',
        config,
        '--deepspeed_config',
        write_ds(tmp_path),
        'model.size=debug',
        'model.img_size=32',
        'model.patch_size=8',
        f'data.root={folder}',
        f'val_data.root={folder}',
        'data.num_workers=0',
        'val_data.num_workers=0',
        f'{task}.pretrained={pretrained_run["run"]}',  # the session's tiny run (tests/conftest.py)
        f'{task}.output_dir={tmp_path / "run"}',
        'data.source=folder',
        'val_data.source=folder',
        'data.pipeline=torch',
        'val_data.pipeline=torch',
        f'{task}.progress_bar=false',
        f'{task}.epochs=20',
        f'{task}.warmup_epochs=1',
        f'{task}.num_classes=2',
        f'{task}.seed=1',
    ]
    proc = start(cmd)
    wait_for_checkpoint(tmp_path / 'run', proc)
    proc.send_signal(signal.SIGTERM)
    rc, out = finish(proc)
    assert rc == EXIT_PREEMPTED, out[-3000:]
    rc, out = finish(start(cmd))
    assert rc == 0 and 'resumed from' in out, out[-3000:]
    assert (tmp_path / 'run' / 'model_last.safetensors').is_file()


def _is_rank(p: psutil.Process) -> bool:
    try:
        cmd = ' '.join(p.cmdline())
    except psutil.Error:  # gone, or a zombie of an earlier launch
        return False
    # DeepSpeed's middle process (deepspeed.launcher.launch) carries the script's command line too
    return 'launch/pretrain.py' in cmd and '--local_rank=' in cmd


def _ranks(launcher: subprocess.Popen, n: int = 2, timeout: float = 600) -> list[psutil.Process]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        ranks = [p for p in psutil.Process(launcher.pid).children(recursive=True) if _is_rank(p)]
        if len(ranks) == n:
            return ranks
        time.sleep(0.2)
    raise AssertionError('ranks did not start')


def launch_two_ranks(tmp_path, folder, *extra) -> subprocess.Popen:
    """`deepspeed --num_gpus 2` on ZeRO-2; its output goes to a file (two chatty ranks could fill a pipe no one
    reads while the test waits), read back by `launcher_output`."""
    a = args(tmp_path, 'run', folder, *extra)
    a[2] = write_ds(tmp_path, 'ds_zero2.json', train_micro_batch_size_per_gpu=2, zero_optimization={'stage': 2})
    cmd = [DEEPSPEED, '--num_gpus', '2', '--master_port', str(free_port()), *a]
    with open(tmp_path / 'launcher.log', 'w') as log:
        return subprocess.Popen(cmd, cwd=ROOT, env=env(), stdout=log, stderr=subprocess.STDOUT)


def launcher_output(tmp_path) -> str:
    return (tmp_path / 'launcher.log').read_text()[-3000:]


@pytest.mark.dist
def test_sigusr1_to_one_rank_stops_both_with_one_checkpoint(tmp_path, folder):
    launcher = launch_two_ranks(tmp_path, folder)
    ranks = _ranks(launcher)
    wait_for_checkpoint(tmp_path / 'run', launcher)
    ranks[1].send_signal(signal.SIGUSR1)
    assert launcher.wait(timeout=300) == EXIT_PREEMPTED, launcher_output(tmp_path)
    ckpts = tmp_path / 'run' / 'checkpoints'
    latest = (ckpts / 'latest').read_text()
    assert (ckpts / latest / 'complete.json').exists()
    note = json.loads((tmp_path / 'run' / 'preempted.json').read_text())
    assert note['ranks'] == {'1': 'SIGUSR1'} and note['checkpoint'].endswith(latest), note
    assert launcher_output(tmp_path).count(f'preempted: SIGUSR1 (rank 1); stopped at step {note["step"]}') == 2


@pytest.mark.dist
def test_ranks_do_not_outlive_the_deepspeed_launcher(tmp_path, folder):
    launcher = launch_two_ranks(tmp_path, folder)
    ranks = _ranks(launcher)
    wait_for(tmp_path / 'run' / 'tensorboard', launcher)
    launcher.kill()  # the `deepspeed` runner: its launch.py child and the ranks are left behind
    launcher.wait(timeout=60)
    gone, alive = psutil.wait_procs(ranks, timeout=300)
    for p in alive:
        p.kill()
    assert not alive, 'ranks outlived their launcher'
    note = json.loads((tmp_path / 'run' / 'preempted.json').read_text())
    # each rank notices on its own clock: the one that noticed first starts the agreed stop, the other may
    # join as its peer before its own check comes round
    assert note['ranks'] and all('launcher process' in why for why in note['ranks'].values()), note
    ckpts = tmp_path / 'run' / 'checkpoints'
    assert (ckpts / (ckpts / 'latest').read_text() / 'complete.json').exists()


@pytest.mark.dist
def test_a_frozen_rank_makes_its_peer_exit_with_a_stall_report(tmp_path, folder):
    """Rank 1 frozen (SIGSTOP) mid-run: rank 0 is stuck in a collective of a step or of a checkpoint save (saves
    every 3 steps); its watchdog ends it with a report, and the launcher ends the job."""
    launcher = launch_two_ranks(tmp_path, folder, 'train.stall_min_s=3', 'train.stall_factor=5', 'train.epochs=1000')
    ranks = _ranks(launcher)
    wait_for_checkpoint(tmp_path / 'run', launcher)
    time.sleep(1.0)
    ranks[1].send_signal(signal.SIGSTOP)
    try:
        rc = launcher.wait(timeout=240)
    finally:
        for p in ranks:
            if p.is_running():
                p.kill()
    out = launcher_output(tmp_path)
    assert rc != 0, out
    assert 'rank 0 stalled' in out, out
    report = (tmp_path / 'run' / 'stall_rank00000.txt').read_text()
    assert 'stalled' in report and 'Thread' in report
