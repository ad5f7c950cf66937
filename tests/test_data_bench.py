"""The data-only benchmark (`python -m cmae_ds.data.tools.bench`): real pipelines on real JPEGs, counts, report.
Rates are not asserted (they are measurements, docs/data.md); what is checked is that every image is counted once
and that both modes run the real graphs end to end."""

from __future__ import annotations

import pytest

from cmae_ds.data.tools import bench

from data_helpers import PIPELINES


@pytest.fixture(scope='module')
def jpeg_root(tmp_path_factory):
    root = tmp_path_factory.mktemp('bench')
    bench.write_imagenet_like(root, 24, size=(120, 90))
    return root


@pytest.mark.parametrize('pipeline', PIPELINES)
def test_time_pipeline_counts_every_image_after_the_first_batch(jpeg_root, pipeline):
    r = bench.time_pipeline(jpeg_root, pipeline, batch=8, threads=1, img_size=32, device='cpu', epochs=2)
    assert r['name'].startswith(pipeline)
    assert r['images'] == 2 * (24 - 8)  # the first batch of each epoch is excluded from the rate
    assert r['seconds'] > 0 and r['rate'] > 0 and r['cpu_ms'] > 0


def test_stage_costs_run_every_prefix_of_the_dali_graph(jpeg_root):
    rows = bench.dali_stage_costs(jpeg_root, batch=8, threads=1, img_size=32, iters=1)
    assert [r[0] for r in rows][0] == 'ROI decode + crop'
    assert rows[-1][0].startswith('full graph')
    assert len(rows) == 7 and all(ms > 0 and rate > 0 for _, ms, rate in rows)


def test_main_prints_every_pipeline_and_its_ratio_to_torch(jpeg_root, capsys):
    bench.main(['--root', str(jpeg_root), '--batch', '8', '--threads', '1', '--img-size', '32', '--epochs', '1'])
    out = capsys.readouterr().out
    assert 'ratio dali-cpu / torch' in out and 'ratio torch_gpu-cpu / torch' in out
