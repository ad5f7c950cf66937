"""`python launch/pretrain.py` with no arguments: the README's first command, end to end (about 1-2 minutes)."""

import re

import pytest

from engine_helpers import run_python, tail

pytestmark = [pytest.mark.slow]


def test_embedded_default_trains_and_reports_its_outputs(tmp_path):
    # Only the output folder moves (so the test leaves the checkout clean); everything else is the default.
    proc = run_python(['launch/pretrain.py', f'train.output_dir={tmp_path}', 'train.progress_bar=false'], timeout=600)
    assert proc.returncode == 0, tail(proc)
    first, last = map(float, re.search(r'loss ([\d.]+) -> ([\d.]+)', proc.stdout).groups())
    assert last < 0.85 * first, proc.stdout  # the loss visibly falls
    assert (tmp_path / 'model.safetensors').is_file()
    assert (tmp_path / 'checkpoints' / 'latest').read_text() == 'step_00000160'
    assert len(list((tmp_path / 'images').glob('*.png'))) >= 2
    assert list((tmp_path / 'tensorboard').glob('events.*'))
    assert not (tmp_path / 'rollbacks.json').exists()  # the default spike rule stays quiet on a healthy run
    for label in ('checkpoint:', 'model file:', 'tensorboard:', 'images:'):
        assert label in proc.stdout
