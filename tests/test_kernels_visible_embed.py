"""Triton gather of visible patch embeddings + position embedding vs its reference, outputs and gradients."""

import os

os.environ['TRITON_INTERPRET'] = '1'  # before the first kernel is decorated: kernels are imported lazily

import pytest
import torch

from cmae_ds.kernels import configure as configure_kernels
from cmae_ds.kernels import gather_visible, last_impl
from cmae_ds.kernels._triton import has_triton, is_interpreted
from cmae_ds.kernels.visible_embed import gather_visible_reference

TOL = {torch.float32: dict(rtol=1e-6, atol=1e-6), torch.bfloat16: dict(rtol=2e-2, atol=2e-2)}


@pytest.fixture
def interpreted():
    if not has_triton():
        pytest.skip('triton is not installed')
    from cmae_ds.kernels.visible_embed import fused

    assert is_interpreted(fused.KERNEL), 'the kernel was compiled before TRITON_INTERPRET=1 was set'


def _inputs(n, num, d, keep, x_dtype, pos_dtype, pos_grad, transposed):
    # The patch embedding's output is usually conv(x).flatten(2).transpose(1, 2): a non-contiguous view.
    x = torch.randn(n, d, num).transpose(1, 2) if transposed else torch.randn(n, num, d)
    x = x.to(x_dtype).requires_grad_()
    pos = torch.randn(1, num, d).to(pos_dtype).requires_grad_(pos_grad)
    ids = torch.stack([torch.randperm(num)[:keep] for _ in range(n)])
    return x, pos, ids


def _run(fn, x, pos, ids, grad_out):
    x.grad = pos.grad = None
    out = fn(x, pos, ids)
    out.backward(grad_out.to(out.dtype))
    return out.detach(), x.grad, pos.grad


def _check(fn_out, ref_out, dtype):
    for a, b in zip(fn_out, ref_out):
        if b is None:
            assert a is None
        else:
            assert a.dtype == b.dtype and a.shape == b.shape
            torch.testing.assert_close(a.float(), b.float(), **TOL[dtype])


@pytest.mark.parametrize('n,num,d,keep', [(1, 25, 24, 9), (3, 36, 40, 13), (2, 16, 8, 0), (2, 16, 8, 16)])
@pytest.mark.parametrize(
    'x_dtype,pos_dtype',
    [(torch.float32, torch.float32), (torch.bfloat16, torch.float32), (torch.bfloat16, torch.bfloat16)],
)
@pytest.mark.parametrize('pos_grad', [True, False])
def test_gather_visible_matches_reference(interpreted, n, num, d, keep, x_dtype, pos_dtype, pos_grad):
    x, pos, ids = _inputs(n, num, d, keep, x_dtype, pos_dtype, pos_grad, transposed=(n == 3))
    grad_out = torch.randn(n, keep, d)
    got = _run(gather_visible, x, pos, ids, grad_out)
    assert last_impl('visible_embed') == 'triton'
    _check(got, _run(gather_visible_reference, x, pos, ids, grad_out), x_dtype)
    hidden = torch.ones(n, num, dtype=torch.bool)
    hidden.scatter_(1, ids, False)
    assert not got[1][hidden].any()  # hidden patches get exactly zero gradient


def test_gather_visible_pos_only_grad(interpreted):
    x, pos, ids = _inputs(2, 16, 8, 5, torch.float32, torch.float32, True, False)
    x.requires_grad_(False)
    out = gather_visible(x, pos, ids)
    out.sum().backward()
    want = torch.zeros(16, 8)
    want.index_put_((ids.reshape(-1),), torch.ones(10, 8), accumulate=True)
    torch.testing.assert_close(pos.grad[0], want)


def test_gather_visible_bad_pos_shape():
    with pytest.raises(ValueError, match='pos must be'):
        gather_visible(torch.zeros(2, 16, 8), torch.zeros(16, 8), torch.zeros(2, 4, dtype=torch.long))


@pytest.mark.parametrize('var', ['CMAE_FUSED', 'CMAE_FUSED_VISIBLE_EMBED'])
def test_gather_visible_switch_routes_to_reference(interpreted, monkeypatch, var):
    x, pos, ids = _inputs(1, 16, 8, 4, torch.float32, torch.float32, True, False)
    gather_visible(x, pos, ids)
    assert last_impl('visible_embed') == 'triton'
    monkeypatch.setenv(var, '0')
    configure_kernels()  # the environment overrides the switches when they are set
    gather_visible(x, pos, ids)
    assert last_impl('visible_embed') == 'reference'
