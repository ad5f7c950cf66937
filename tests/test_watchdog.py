"""The step watchdog on its own, in a child process (it ends its process with os._exit when it fires).

The frozen-peer test in test_preemption.py exercises it inside a real two-rank run; these pin its rules: steps
judged after the warm-up, saves and evaluations judged against earlier ones of their kind, the first of a kind not
judged."""

import subprocess
import sys
import textwrap

from engine_helpers import ROOT, env

EXIT_STALLED = 76

PRELUDE = """
import sys, time
from pathlib import Path
from cmae_ds.engine.guards.watchdog import StepWatchdog
dog = StepWatchdog(Path(sys.argv[1]), rank=3, factor=4, min_s=0.3, warmup=3, poll_s=0.02).start()
def steps(n, first=1):
    for i in range(first, first + n):
        time.sleep(0.01)
        dog.beat(i)
"""


def run(tmp_path, body: str) -> subprocess.CompletedProcess:
    code = PRELUDE + textwrap.dedent(body)
    return subprocess.run(
        [sys.executable, '-c', code, str(tmp_path)], cwd=ROOT, env=env(), capture_output=True, text=True, timeout=60
    )


def test_a_stalled_step_dumps_stacks_and_exits_76(tmp_path):
    proc = run(tmp_path, "steps(5)\ntime.sleep(5)\nprint('not stopped')")
    assert proc.returncode == EXIT_STALLED, proc.stdout + proc.stderr
    assert 'not stopped' not in proc.stdout
    assert 'rank 3 stalled: no optimizer step completed after step 5' in proc.stderr
    report = (tmp_path / 'stall_rank00003.txt').read_text()
    assert 'stalled' in report and 'Thread' in report
    assert '<string>' in report  # the stalled main thread's frame is in the report


def test_steps_before_the_warmup_are_not_judged(tmp_path):
    proc = run(tmp_path, "steps(2)\ntime.sleep(1.0)\nsteps(2, 3)\nprint('ok')")
    assert proc.returncode == 0 and 'ok' in proc.stdout, proc.stderr


def test_the_first_save_is_not_judged_a_later_slow_one_is(tmp_path):
    body = """
    steps(4)
    with dog.phase('checkpoint save'):
        time.sleep(1.0)  # the first save: far over min_s, not judged
    steps(2, 5)
    with dog.phase('checkpoint save'):
        time.sleep(0.05)  # within the limit
    print('saves ok', flush=True)
    with dog.phase('checkpoint save'):
        time.sleep(5)  # over max(4 x median 0.525 s, 0.3 s)
    print('not stopped')
    """
    proc = run(tmp_path, body)
    assert proc.returncode == EXIT_STALLED, proc.stdout + proc.stderr
    assert 'saves ok' in proc.stdout and 'not stopped' not in proc.stdout
    assert 'checkpoint save after step 6 did not end' in proc.stderr


def test_a_long_phase_does_not_count_against_the_next_step(tmp_path):
    body = """
    steps(4)
    with dog.phase('end of epoch'):
        time.sleep(1.0)
    time.sleep(0.1)
    steps(3, 5)
    print('ok')
    """
    proc = run(tmp_path, body)
    assert proc.returncode == 0 and 'ok' in proc.stdout, proc.stderr


def test_factor_zero_switches_it_off(tmp_path):
    body = """
    dog.stop()
    off = StepWatchdog(Path(sys.argv[1]), rank=0, factor=0, min_s=0, poll_s=0.02).start()
    for i in range(1, 6):
        off.beat(i)
    time.sleep(0.5)
    print('ok')
    """
    proc = run(tmp_path, body)
    assert proc.returncode == 0 and 'ok' in proc.stdout, proc.stderr
