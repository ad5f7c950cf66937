"""launch/gpu_checks.sh, the one prepared run for a session lent a GPU: it cannot run here, so what is checked is
what would waste a short lease: syntax, files it names, and that a failing or hanging step does not stop the rest."""
import re
import subprocess

import pytest
from pathlib import Path

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
    body = ('source "$1"; fails() { echo inside; return 3; }; export -f fails; '
            'step one 5 fails; step two 1 sleep 5; step three 5 echo ok')
    proc = subprocess.run(['bash', '-c', body, 'bash', str(SCRIPT)], cwd=tmp_path, capture_output=True, text=True,
                          env={'OUT': str(tmp_path), 'PATH': '/usr/bin:/bin'}, timeout=60)
    assert proc.returncode == 0, proc.stderr
    summary = (tmp_path / 'summary.txt').read_text().splitlines()
    assert [line.split(' in ')[0] for line in summary] == ['one: rc=3', 'two: rc=124', 'three: rc=0']
    log = (tmp_path / 'log.txt').read_text()
    assert 'inside' in log and 'ok' in log
