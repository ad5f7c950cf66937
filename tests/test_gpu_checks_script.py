"""launch/gpu_checks.sh, the one prepared run for a session lent a GPU: it cannot run here, so what is checked is
what would waste a short lease: syntax, files it names, and that a failing or hanging step does not stop the rest."""

import itertools
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / 'launch' / 'gpu_checks.sh'


def test_syntax_and_usage():
    assert subprocess.run(['bash', '-n', str(SCRIPT)]).returncode == 0
    proc = subprocess.run(['bash', str(SCRIPT)], capture_output=True, text=True)
    assert proc.returncode == 2 and 'usage' in proc.stderr


def test_every_file_and_preset_it_names_exists():
    text = SCRIPT.read_text()
    configs = set(re.findall(r'ds_configs/[\w.]+\.json', text))
    assert configs and all((ROOT / c).is_file() for c in configs), configs
    presets = set(re.findall(r'--config (\w+)', text))
    assert presets and all((ROOT / 'cmae_ds' / 'presets' / f'{p}.yaml').is_file() for p in presets), presets
    tests = set(re.findall(r'tests/\w+\.py', text))
    assert tests and all((ROOT / t).is_file() for t in tests), tests


@pytest.mark.slow
def test_a_failing_or_hanging_step_is_logged_and_the_next_still_runs(tmp_path):
    body = (
        'source "$1"; fails() { echo inside; return 3; }; export -f fails; '
        'step one 5 fails; step two 1 sleep 5; step three 5 echo ok'
    )
    proc = subprocess.run(
        ['bash', '-c', body, 'bash', str(SCRIPT)],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        env={'OUT': str(tmp_path), 'PATH': '/usr/bin:/bin'},
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    summary = (tmp_path / 'summary.txt').read_text().splitlines()
    assert [line.split(' in ')[0] for line in summary] == ['one: rc=3', 'two: rc=124', 'three: rc=0']
    log = (tmp_path / 'log.txt').read_text()
    assert 'inside' in log and 'ok' in log


def _source(body: str, tmp_path, **env):
    return subprocess.run(
        ['bash', '-c', 'source "$1"; ' + body, 'bash', str(SCRIPT)],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
        env={'OUT': str(tmp_path), 'PATH': '/usr/bin:/bin', **env},
    )


def test_the_budget_caps_every_step_and_skips_what_no_longer_fits(tmp_path):
    """BUDGET_S bounds the whole run: a step gets at most what is left, and under 5 s left it is skipped."""
    proc = _source('step long 100 sleep 30; step next 100 echo never', tmp_path, BUDGET_S='8')
    assert proc.returncode == 0, proc.stderr
    summary = (tmp_path / 'summary.txt').read_text().splitlines()
    assert summary[0].startswith('long: rc=124 in ') and int(summary[0].split(' in ')[1].split()[0]) <= 12
    assert summary[1] == 'next: skipped (budget of 8 s spent)'


def _estimates(text: str) -> dict:
    """The header's per-step estimate (`NAME SECONDS` pairs, in order, up to the 'expected' line)."""
    block = text[text.index('# Estimate per step') : text.index('\n# about ')]
    block = re.sub(r'\([^)]*\)', '', block.split('seconds:', 1)[1])  # the notes in brackets hold numbers too
    return {name: int(sec) for name, sec in re.findall(r'\b([a-z][a-z0-9_]+) (\d+)\b', block)}


def _run_order(text: str) -> list:
    """The step names of the run, in order: install, steps(), then the report."""
    body = text[text.index('\nsteps() {') : text.index('\noptional_steps() {')]
    return ['install'] + re.findall(r'^\s*(?:\(\(DRY\)\) && )?(?:gpu_)?step (\w+) \d+', body, re.M) + ['report']


def test_the_step_limits_and_the_estimate_fit_eight_minutes():
    """The header's estimate is per step and in the run's order: every step is costed, the sums it states are the
    sums of its figures, the headline figures come back in the first 3 minutes and the run up to the compiler's
    pairs inside the budget. (The dry run's CPU-only shm_comm build is not a GPU step.)"""
    text = SCRIPT.read_text()
    budget = int(re.search(r'BUDGET_S=\$\{BUDGET_S:-(\d+)\}', text).group(1))
    report_extra = int(re.search(r'BUDGET_S=\$\(\(BUDGET_S \+ (\d+)\)\) step report', text).group(1))
    assert budget + report_extra <= 8 * 60
    costs, order = _estimates(text), [s for s in _run_order(text) if s != 'shm_comm']
    assert list(costs) == order, (list(costs), order)
    headline, proofs, compiled = [int(t) for t in re.findall(r'-> (\d+) s', text)]
    cumulative = dict(zip(order, itertools.accumulate(costs.values())))
    assert (cumulative['model_l'], cumulative['attention_tests'], cumulative['compile_bl']) == (
        headline,
        proofs,
        compiled,
    )
    assert headline <= 180
    estimate = int(re.search(r'about (\d+) s \(\d+ min\) expected', text).group(1))
    assert estimate == compiled < budget


def test_report_names_what_is_missing(tmp_path):
    out, work = tmp_path / 'out', tmp_path / 'work'
    out.mkdir()
    work.mkdir()
    (out / 'summary.txt').write_text('install: rc=0 in 20 s\n')
    proc = subprocess.run(
        [sys.executable, str(ROOT / 'launch' / 'gpu_report.py'), str(out), str(work)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    md = (out / 'benchmarks.md').read_text()
    assert 'install: rc=0' in md and 'No data result' in md and 'No e2e comparison' in md and 'No ViT-L cell' in md
    assert 'kernels.md missing' in md


@pytest.mark.slow
def test_dry_run_runs_every_cpu_step_and_writes_the_fragment(tmp_path):
    """The same steps on the debug model, tiny JPEGs and the CPU: argument plumbing, files, the report."""
    out, work = tmp_path / 'out', tmp_path / 'work'
    env = {
        **os.environ,
        'OUT': str(out),
        'WORK': str(work),
        'PATH': f'{Path(sys.executable).parent}:{os.environ["PATH"]}',
        'PYTHONPATH': str(ROOT),
    }
    proc = subprocess.run(['bash', str(SCRIPT), 'dry-run'], capture_output=True, text=True, env=env, timeout=1500)
    assert proc.returncode == 0, proc.stderr
    summary = dict(line.split(': ', 1) for line in (out / 'summary.txt').read_text().splitlines())
    skipped = {k for k, v in summary.items() if v == 'skipped (dry run)'}
    gpu_only = {'install', 'torch_compat', 'kernels', 'attention_tests', 'data_gpu_tests', 'fused_adam', 'adamw_tests'}
    assert skipped == gpu_only
    failed = {k: v for k, v in summary.items() if k not in skipped and not v.startswith('rc=0 ')}
    assert not failed, (failed, (out / 'log.txt').read_text()[-3000:])
    rows = json.loads((out / 'results.json').read_text())
    assert all(rows[k] for k in ('model_b', 'e2e_b', 'model_l', 'sweep_bl', 'sweep_h', 'ckpt_h'))
    # compile_bl ran with the CUDA default forced (blocks, eager backend): one pair per configuration, no fall-back
    pairs = rows['compile_b'] + rows['compile_l']
    assert [r['extra']['compile'] for r in pairs] == ['eager', 'blocks'] * 2, pairs
    assert not any('compile_fallback' in r['extra'] or r.get('error') for r in pairs), pairs
    assert all(r['extra']['compile'] == 'eager' for k in ('model_b', 'e2e_b', 'model_l', 'sweep_bl') for r in rows[k])
    assert rows['e2e_b'][0]['extra']['data'] == 'torch_gpu-cpu'
    md = (out / 'benchmarks.md').read_text()
    assert 'torch_gpu-cpu: **' in md and 'data-wait fraction' in md and '| debug | 3 |' in md


def test_no_timed_step_can_compile_fused_adam(tmp_path):
    """Every engine the run builds takes train.optimizer=$ADAMW, which is 'auto' (DeepSpeed's FusedAdam first) only
    when `jit_ops ready fused_adam` says its op is built (tests/test_kernels_jit_ops.py): otherwise its first use
    would run nvcc inside a timed step. A stand-in python3 answers for jit_ops here."""
    text = SCRIPT.read_text()
    launches = re.findall(r'python3 launch/(?:benchmark|pretrain)\.py[^\n]*\n[^\n]*\n[^\n]*', text)
    assert len(launches) == 3 and all('train.optimizer="$ADAMW"' in cmd for cmd in launches), launches
    # and each names its compile mode: `auto` would compile on CUDA and not here, a difference the dry run would hide
    assert all('model.compile=eager' in cmd for cmd in launches), launches
    bin_dir = tmp_path / 'bin'
    bin_dir.mkdir()
    (bin_dir / 'python3').write_text('#!/bin/bash\necho "$*" >>"$CALLS"; exit "$READY"\n')
    (bin_dir / 'python3').chmod(0o755)
    calls = tmp_path / 'calls'
    for ready, want in (('1', 'torch_fused'), ('0', 'auto')):
        env = dict(PATH=f'{bin_dir}:/usr/bin:/bin', READY=ready, CALLS=str(calls))
        proc = _source('adamw_choice; echo "=$ADAMW"', tmp_path, **env)
        assert proc.stdout.strip().endswith(f'={want}'), proc.stdout + proc.stderr
    assert calls.read_text().splitlines() == ['-m cmae_ds.kernels.optim.jit_ops ready fused_adam'] * 2


def _stand_in_python(tmp_path, body: str) -> dict:
    bin_dir = tmp_path / 'bin'
    bin_dir.mkdir()
    (bin_dir / 'python3').write_text(f'#!/bin/bash\n{body}\n')
    (bin_dir / 'python3').chmod(0o755)
    (bin_dir / 'nvidia-smi').write_text('#!/bin/bash\necho stand-in GPU\n')
    (bin_dir / 'nvidia-smi').chmod(0o755)
    return dict(PATH=f'{bin_dir}:/usr/bin:/bin', WORK=str(tmp_path / 'work'), OUT=str(tmp_path / 'out'))


@pytest.mark.parametrize('failing, line', [('pip', 'stopped: install failed'), ('import', 'stopped: cmae_ds does not')])
def test_a_failed_install_or_import_stops_the_run_with_one_line(tmp_path, failing, line):
    """The GPU run with a stand-in python3 whose pip (or whose import of the project) fails: no later step runs,
    summary.txt says why in one line, and the report still runs."""
    fail = 'case "$*" in *"pip install"*) exit 1;; esac' if failing == 'pip' else '[[ $1 == - ]] && exit 1'
    body = f'[[ $1 == - ]] && cat >/dev/null; {fail}; exit 0'
    env = _stand_in_python(tmp_path, body)
    proc = subprocess.run(['bash', str(SCRIPT), 'run'], capture_output=True, text=True, timeout=60, env=env)
    assert proc.returncode == 0, proc.stderr
    summary = (tmp_path / 'out' / 'summary.txt').read_text().splitlines()
    stopped = [s for s in summary if s.startswith('stopped:')]
    assert len(stopped) == 1 and stopped[0].startswith(line), summary
    steps = [s.split(':')[0] for s in summary if not s.startswith('stopped')]
    assert steps == (['install', 'report'] if failing == 'pip' else ['install', 'imports', 'report']), summary
