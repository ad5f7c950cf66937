"""Triton reconstruction loss vs its reference (outputs and gradients), run by the Triton interpreter on CPU."""

import os

os.environ['TRITON_INTERPRET'] = '1'  # before the first kernel is decorated: kernels are imported lazily

import pytest
import torch

from cmae_ds.kernels import configure as configure_kernels
from cmae_ds.kernels import last_impl, recon_loss
from cmae_ds.kernels._triton import has_triton, is_interpreted
from cmae_ds.kernels.recon_loss import patchify, recon_loss_and_grad, recon_loss_reference

TOL = {torch.float32: dict(rtol=1e-5, atol=1e-6), torch.bfloat16: dict(rtol=2e-2, atol=1e-2)}


@pytest.fixture
def interpreted():
    if not has_triton():
        pytest.skip('triton is not installed')
    from cmae_ds.kernels.recon_loss import fused

    assert is_interpreted(fused.KERNEL), 'the kernel was compiled before TRITON_INTERPRET=1 was set'


def _inputs(n, grid, p, dtype, hidden):
    num = grid * grid
    img = torch.randn(n, 3, grid * p, grid * p).to(dtype)
    pred = torch.randn(n, num, p * p * 3).to(dtype).requires_grad_()
    if hidden == 'none':
        mask = torch.zeros(n, num, dtype=torch.bool)
    elif hidden == 'all':
        mask = torch.ones(n, num, dtype=torch.bool)
    else:
        mask = torch.rand(n, num) < 0.6
    return img, pred, mask


def _loss_and_grad(fn, img, pred, mask, p):
    pred.grad = None
    loss = fn(img, pred, mask, p)
    loss.backward()
    return loss.detach(), pred.grad.clone()


def _close(a, b, dtype):
    scale = b.abs().max().clamp_min(1e-12)  # grads are small (~2/(P*M)): compare relative to their size
    tol = TOL[dtype]
    torch.testing.assert_close(a.float() / scale, b.float() / scale, **tol)


def test_patchify_layout():
    """patchify(img)[n, gy*g+gx, (r*p+c)*3+ch] == img[n, ch, gy*p+r, gx*p+c]: patch-major, channels last."""
    img = torch.randn(2, 3, 12, 12)
    x = patchify(img, 4)
    for n, gy, gx, r, c, ch in [(0, 0, 0, 0, 0, 0), (1, 2, 1, 3, 2, 1), (1, 1, 2, 0, 3, 2)]:
        assert x[n, gy * 3 + gx, (r * 4 + c) * 3 + ch] == img[n, ch, gy * 4 + r, gx * 4 + c]


@pytest.mark.parametrize('dtype', [torch.float32, torch.bfloat16])
@pytest.mark.parametrize('n,grid,p', [(1, 5, 4), (3, 6, 8), (2, 3, 14)])
@pytest.mark.parametrize('hidden', ['random', 'none', 'all'])
def test_recon_loss_matches_reference(interpreted, dtype, n, grid, p, hidden):
    img, pred, mask = _inputs(n, grid, p, dtype, hidden)
    loss, grad = _loss_and_grad(recon_loss, img, pred, mask, p)
    assert last_impl('recon_loss') == 'triton'
    ref_loss, ref_grad = _loss_and_grad(recon_loss_reference, img, pred, mask, p)
    assert loss.dtype == torch.float32 and grad.dtype == dtype
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-6)
    if hidden == 'none':
        assert loss.item() == 0.0 and ref_loss.item() == 0.0
        assert not grad.any() and not ref_grad.any()
    else:
        _close(grad, ref_grad, dtype)


def test_recon_loss_float_mask_noncontiguous_pred_and_scaled_grad(interpreted):
    img, pred, mask = _inputs(2, 4, 4, torch.float32, 'random')
    wide = torch.randn(2, 16, 96, requires_grad=True)
    pred_view = wide[:, :, ::2]  # non-contiguous (2, 16, 48)
    loss = recon_loss(img, pred_view, mask.float(), 4)
    (3.0 * loss).backward()
    ref_wide = wide.detach().clone().requires_grad_()
    ref = recon_loss_reference(img, ref_wide[:, :, ::2], mask, 4)
    (3.0 * ref).backward()
    torch.testing.assert_close(loss, ref)
    _close(wide.grad, ref_wide.grad, torch.float32)


@pytest.mark.parametrize('dtype', [torch.float32, torch.bfloat16])
def test_recon_loss_and_grad_one_pass(interpreted, monkeypatch, dtype):
    img, pred, mask = _inputs(2, 6, 4, dtype, 'random')
    loss, grad = recon_loss_and_grad(img, pred, mask, 4)
    assert last_impl('recon_loss') == 'triton' and grad.dtype == dtype
    monkeypatch.setenv('CMAE_FUSED_RECON_LOSS', '0')
    configure_kernels()  # the environment overrides the switches when they are set
    ref_loss, ref_grad = recon_loss_and_grad(img, pred, mask, 4)
    assert last_impl('recon_loss') == 'reference'
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-6)
    _close(grad, ref_grad, dtype)


def test_recon_loss_no_grad_to_image(interpreted):
    img, pred, mask = _inputs(1, 4, 4, torch.float32, 'random')
    img.requires_grad_()
    recon_loss(img, pred, mask, 4).backward()
    assert img.grad is None and pred.grad is not None


def test_recon_loss_kernel_can_fail(interpreted):
    """The comparison is sensitive: a transposed prediction layout gives a different loss."""
    img, pred, mask = _inputs(1, 4, 4, torch.float32, 'all')
    swapped = pred.detach().reshape(1, 16, 4, 4, 3).transpose(2, 3).reshape(1, 16, 48)
    assert not torch.allclose(recon_loss(img, pred, mask, 4), recon_loss_reference(img, swapped, mask, 4))


@pytest.mark.parametrize('var', ['CMAE_FUSED', 'CMAE_FUSED_RECON_LOSS'])
def test_recon_loss_switch_routes_to_reference(interpreted, monkeypatch, var):
    img, pred, mask = _inputs(1, 4, 4, torch.float32, 'random')
    recon_loss(img, pred, mask, 4)
    assert last_impl('recon_loss') == 'triton'
    monkeypatch.setenv(var, '0')
    configure_kernels()  # the environment overrides the switches when they are set
    recon_loss(img, pred, mask, 4)
    assert last_impl('recon_loss') == 'reference'
