"""The benchmark's CPU mode: a correctness pass of every Triton kernel against its reference."""

import math
import os

os.environ['TRITON_INTERPRET'] = '1'  # before the first kernel is decorated: kernels are imported lazily

import pytest

from cmae_ds.kernels import bench
from cmae_ds.kernels._triton import has_triton


def test_cpu_correctness_pass():
    if not has_triton():
        pytest.skip('triton is not installed')
    results = bench.check(list(bench.CASES))
    assert set(results) == {'recon_loss', 'ema', 'visible_embed'}
    for op, (impl, err) in results.items():
        assert impl == 'triton', op
        assert err <= bench.TOLERANCE[op], (op, err)
    assert bench.wrong_ops(results) == []


@pytest.mark.parametrize('op', ['recon_loss', 'visible_embed'])
def test_a_wrong_kernel_fails_the_run(monkeypatch, capsys, op):
    """A planted kernel that is off by 5% (a scaled output, as a wrong normalization would give) makes the check
    name it and the command exit non-zero; the true one passes."""
    assert bench.main(['--ops', op]) == 0
    right = bench.FUSED[op]
    monkeypatch.setitem(bench.FUSED, op, lambda *args: right(*args) * 1.05)
    capsys.readouterr()
    assert bench.main(['--ops', op]) == 1
    assert capsys.readouterr().out.strip().splitlines()[-1].endswith('WRONG')
    assert bench.wrong_ops(bench.check([op])) == [op]


def test_vit_b_ema_shapes():
    """The EMA benchmark's tensor set is ViT-B/16's encoder and projector: ~150 tensors, ~87M parameters."""
    shapes = bench._vit_b_shapes()
    assert len(shapes) == 152 and 86e6 < sum(math.prod(s) for s in shapes) < 88e6
