"""The shared per-sample draws (cmae_ds.data.views.draws): keyed, uniform, independent, the same one at a time as in a
batch (the torch workers draw per sample, the DALI feed per batch)."""

import numpy as np

from cmae_ds.data.views import recipe as C
from cmae_ds.data.views.draws import DALI_COLUMNS, UNIFORMS, dali_columns, draw_batch, draw_views, uniforms


def test_uniforms_are_keyed_and_deterministic():
    a = uniforms(3, 1, [5, 9, 5])
    assert a.shape == (3, UNIFORMS) and np.array_equal(a[0], a[2]) and not np.array_equal(a[0], a[1])
    assert np.array_equal(a, uniforms(3, 1, [5, 9, 5]))
    assert not np.allclose(a, uniforms(3, 2, [5, 9, 5])) and not np.allclose(a, uniforms(4, 1, [5, 9, 5]))


def test_uniforms_are_uniform_and_uncorrelated():
    u = uniforms(0, 0, np.arange(20000))
    assert u.min() >= 0 and u.max() < 1
    counts = np.histogram(u, bins=20, range=(0, 1))[0]
    expected = u.size / 20
    assert ((counts - expected) ** 2 / expected).sum() < 45.3  # chi2, 19 dof, p 0.001
    c = np.corrcoef(u[:, :8].T)  # across positions of one sample
    assert np.abs(c - np.eye(8)).max() < 0.04
    adjacent = np.corrcoef(u[:-1, 0], u[1:, 0])[0, 1]  # across neighbouring indices
    assert abs(adjacent) < 0.04


def test_one_sample_equals_its_row_of_the_batch():
    batch = draw_batch(7, 2, [11, 40, 3], extra=32)
    one = draw_views(7, 2, 40, extra=32)
    assert np.array_equal(one.scale, batch['scale'][1]) and np.array_equal(one.aspect, batch['aspect'][1])
    assert (one.flip, one.dy, one.dx, one.jitter, one.gray, one.blur) == tuple(
        batch[k][1].item() for k in ('flip', 'dy', 'dx', 'jitter', 'gray', 'blur')
    )
    assert one.order == tuple(batch['order'][1].tolist()) and sorted(one.order) == [0, 1, 2, 3]


def test_rates_and_ranges():
    d = draw_batch(0, 0, np.arange(20000), extra=32)
    for key, p in (('flip', 0.5), ('jitter', C.JITTER_P), ('gray', C.GRAY_P), ('blur', C.BLUR_P)):
        assert abs(d[key].mean() - p) < 0.015, key
    assert d['dy'].min() == 0 and d['dy'].max() == 31 and np.bincount(d['dx'], minlength=32).min() > 500
    assert 0.2 <= d['scale'].min() and d['scale'].max() < 1
    assert 0.75 <= d['aspect'].min() and d['aspect'].max() <= 4 / 3 + 1e-6
    assert 0.1 <= d['sigma'].min() and d['sigma'].max() < 2
    assert np.abs(d['factors'][:, 3]).max() <= C.HUE and np.abs(d['factors'][:, :3] - 1).max() <= 0.4
    first_op = np.bincount(d['order'][:, 0], minlength=4) / len(d['order'])
    assert np.abs(first_op - 0.25).max() < 0.015


def test_dali_columns_fold_jitter_and_grayscale_into_the_twist():
    d = draw_batch(0, 0, np.arange(400), extra=32)
    cols = dict(zip(DALI_COLUMNS, dali_columns(d)))
    assert len(cols) == len(DALI_COLUMNS)
    off = ~d['jitter']
    assert (cols['brightness'][off] == 1).all() and (cols['hue'][off] == 0).all()
    assert (cols['saturation'][d['gray']] == 0).all()
    on = d['jitter'] & ~d['gray']
    assert np.allclose(cols['hue'][on], d['factors'][on, 3] * 360, atol=1e-4)
