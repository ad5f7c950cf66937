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


def test_guards_on_and_off_and_the_step_settings_side_by_side(tmp_path):
    """--guards both: the cell as a run has it (the rollback guard judging every step) and bare; then
    --compare-step-settings on a bf16 ZeRO-2 JSON: the settings before issue 33 and now, in one process."""
    out = tmp_path / 'guards.json'
    proc = run_python(['launch/benchmark.py', '--guards', 'both', '--out', str(out), *SMALL])
    assert proc.returncode == 0, tail(proc)
    on, off = json.loads(out.read_text())
    assert (on['extra']['guards'], off['extra']['guards']) == ('on', 'off')
    assert on['extra']['guard_events'] == 0 and 'guard_events' not in off['extra']
    assert on['extra']['guard_cost'] > 0 and 'guards is' in proc.stdout
    ds = tmp_path / 'z2.json'
    z2 = {'train_micro_batch_size_per_gpu': 2, 'bf16': {'enabled': True, 'check_grad_overflow': False}}
    ds.write_text(json.dumps({**z2, 'zero_optimization': {'stage': 2}, 'timers': {'throughput': {'enabled': False}}}))
    out = tmp_path / 'settings.json'
    args = ['--compare-step-settings', '--deepspeed_config', str(ds), '--out', str(out), *SMALL]
    proc = run_python(['launch/benchmark.py', *args])
    assert proc.returncode == 0, tail(proc)
    old, new = json.loads(out.read_text())
    assert old['error'] is None and new['error'] is None
    assert (old['extra']['guards'], new['extra']['guards']) == ('immediate', 'on')
    assert old['extra']['ema_impl'] == 'foreach' and new['extra']['ema_impl'].startswith('master')
    assert new['extra']['speedup_vs_old'] > 0 and 'settings before issue 33' in proc.stdout
