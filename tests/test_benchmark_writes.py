"""launch/benchmark.py rewrites its JSON after every cell: a sweep stopped by its time limit (gpu_checks.sh gives
each a few minutes) still hands gpu_report.py every cell it finished. The cells themselves stand in here (their
real runs are test_benchmark.py's, slow); what is tested is the sweep's writing."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch

from cmae_ds.engine import dist
from cmae_ds.tasks.benchmark import BenchResult

ROOT = Path(__file__).resolve().parents[1]


def _script():
    spec = importlib.util.spec_from_file_location('benchmark_script', ROOT / 'launch' / 'benchmark.py')
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class Stopped(BaseException):
    """What the time limit's signal does to the sweep: nothing after it runs."""


def test_a_sweep_stopped_after_its_first_cell_leaves_that_cell(tmp_path, monkeypatch):
    script = _script()
    ctx = dist.DistContext(0, 1, 0, torch.device('cpu'))
    monkeypatch.setattr(dist, 'setup_distributed', lambda: ctx)
    done = []

    def run_one(args, ds_name, ds, overrides, ctx):
        if done:
            raise Stopped
        r = BenchResult('model', 'debug', 'cmae', ds_name, ds['train_micro_batch_size_per_gpu'], 1, 'fp32', 0, 'cpu')
        r.step_ms_median = 12.5
        done.append(r)
        return r

    monkeypatch.setattr(script, 'run_one', run_one)
    out = tmp_path / 'sweep.json'
    with pytest.raises(Stopped):
        script.main(['--mode', 'model', '--micro', '2', '4', '8', '--out', str(out)])
    [row] = json.loads(out.read_text())
    assert row['micro_batch'] == 2 and row['step_ms_median'] == 12.5
    assert [p.name for p in tmp_path.iterdir()] == ['sweep.json']  # no temporary file left beside it
