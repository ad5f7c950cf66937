"""CPU smoke runs of launch/benchmark.py on the debug size: every mode, a sweep with a failing cell, fusion on/off.
No timing assertions: speed is measured by the benchmark, not by tests."""

import json

import pytest

from engine_helpers import run_python, tail

pytestmark = [pytest.mark.slow]

SMALL = ['--warmup', '1', '--steps', '2', 'model.img_size=32', 'model.patch_size=8', 'train.progress_bar=false']


@pytest.mark.parametrize('mode', ['model', 'data', 'e2e'])
def test_each_mode_reports_its_fields(tmp_path, mode):
    out = tmp_path / 'bench.json'
    proc = run_python(
        ['launch/benchmark.py', '--mode', mode, '--out', str(out), *SMALL, 'data.pipeline=torch', 'data.num_workers=0']
    )
    assert proc.returncode == 0, tail(proc)
    [row] = json.loads(out.read_text())
    assert row['error'] is None and row['mode'] == mode
    assert row['images_per_s_per_device'] > 0 and row['step_ms_p90'] >= row['step_ms_median'] > 0
    assert row['peak_mem_gib'] > 0
    if mode != 'data':
        assert row['gflop_per_image'] > 0 and row['tflops_per_device'] > 0
        assert row['mfu'] is None  # no peak is known for a CPU
        assert row['optimizer'] and row['attention']
        assert 0.0 <= row['data_wait_fraction'] <= 1.0
    assert 'img/s/dev' in proc.stdout


def test_sweep_records_a_failing_cell_and_continues(tmp_path):
    out = tmp_path / 'sweep.json'
    proc = run_python(['launch/benchmark.py', '--mode', 'model', '--micro', '1', '4', '--out', str(out), *SMALL])
    assert proc.returncode == 0, tail(proc)
    rows = json.loads(out.read_text())
    assert [r['micro_batch'] for r in rows] == [1, 4]
    assert 'train_micro_batch_size_per_gpu' in rows[0]['error']  # BatchNorm needs 2 samples: the cell fails
    assert rows[1]['error'] is None and rows[1]['images_per_s_total'] > 0


def test_compare_fusion_runs_both_paths(tmp_path):
    out = tmp_path / 'fusion.json'
    proc = run_python(['launch/benchmark.py', '--compare-fusion', '--out', str(out), *SMALL])
    assert proc.returncode == 0, tail(proc)
    fused, plain = json.loads(out.read_text())
    assert fused['extra']['fusion'] == 'on' and plain['extra']['fusion'] == 'off'
    assert plain['attention'] == 'math'
    assert fused['extra']['speedup_vs_unfused'] > 0
