"""Every attention backend that can run here vs the math reference; the forcing and kill switches."""

import importlib
import logging

import pytest
import torch

from cmae_ds.kernels import attention, attention_backend, last_impl
from cmae_ds.kernels import configure as configure_kernels
from cmae_ds.kernels.attention import BACKENDS, attention_reference

DEVICE = torch.device('cuda' if torch.cuda.is_available() else 'cpu')
# `cmae_ds.kernels.attention` as an attribute is the function; the package is reached through the import system.
attn_mod = importlib.import_module('cmae_ds.kernels.attention')
TOL = {torch.float32: dict(rtol=1e-4, atol=1e-5), torch.bfloat16: dict(rtol=2e-2, atol=2e-2)}


def _qkv(dtype, n=2, heads=3, length=37, head_dim=16):  # 37: not a multiple of any kernel tile
    return [torch.randn(n, heads, length, head_dim, device=DEVICE).to(dtype).requires_grad_() for _ in range(3)]


def _out_and_grads(fn, q, k, v, grad_out):
    for t in (q, k, v):
        t.grad = None
    out = fn(q, k, v)
    out.backward(grad_out)
    return [out.detach()] + [t.grad.clone() for t in (q, k, v)]


@pytest.mark.parametrize('dtype', [torch.float32, torch.bfloat16])
@pytest.mark.parametrize('name', list(BACKENDS))
def test_backend_matches_math(monkeypatch, name, dtype):
    why = BACKENDS[name][1](DEVICE, dtype, 16)
    if why is not None:
        pytest.skip(why)
    monkeypatch.setenv('CMAE_ATTN_BACKEND', name)
    configure_kernels()  # the environment overrides the switches when they are set
    q, k, v = _qkv(dtype)
    grad_out = torch.randn_like(q)
    got = _out_and_grads(attention, q, k, v, grad_out)
    assert last_impl('attention') == name
    # The reference computes in fp32 from the same (possibly bf16) inputs: the ground truth for every backend.
    want = _out_and_grads(attention_reference, q, k, v, grad_out)
    for a, b in zip(got, want):
        assert a.dtype == dtype and a.shape == b.shape
        torch.testing.assert_close(a.float(), b.float(), **TOL[dtype])


def test_math_reference_is_softmax_attention():
    q, k, v = [t.detach().double() for t in _qkv(torch.float32, n=1, heads=1, length=5, head_dim=4)]
    scores = torch.einsum('nhid,nhjd->nhij', q, k) / 2.0  # 4 ** -0.5
    want = torch.einsum('nhij,nhjd->nhid', torch.exp(scores) / torch.exp(scores).sum(-1, keepdim=True), v)
    torch.testing.assert_close(attention_reference(q, k, v), want)


def test_auto_picks_sdpa_on_cpu():
    if DEVICE.type == 'cuda':
        pytest.skip('CPU-only expectation')
    assert attention_backend() == 'sdpa'
    attention(*_qkv(torch.float32))
    assert last_impl('attention') == 'sdpa'


def test_forced_backend_unavailable_raises(monkeypatch):
    q, k, v = _qkv(torch.float32)
    monkeypatch.setenv('CMAE_ATTN_BACKEND', 'fa3')  # fp32 input: FA3 can never take it
    configure_kernels()  # the environment overrides the switches when they are set
    with pytest.raises(RuntimeError, match='attention backend fa3 cannot run'):
        attention(q, k, v)
    monkeypatch.setenv('CMAE_ATTN_BACKEND', 'flash')
    configure_kernels()  # the environment overrides the switches when they are set
    with pytest.raises(ValueError, match='expected one of'):
        attention(q, k, v)


@pytest.mark.parametrize('var', ['CMAE_FUSED', 'CMAE_FUSED_ATTENTION'])
def test_kill_switch_gives_math(monkeypatch, var):
    monkeypatch.setenv(var, '0')
    configure_kernels()  # the environment overrides the switches when they are set
    attention(*_qkv(torch.float32))
    assert last_impl('attention') == 'math' and attention_backend() == 'math'


def test_backend_logged_once(monkeypatch, caplog):
    monkeypatch.setattr(attn_mod, '_logged', set())
    monkeypatch.setenv('CMAE_ATTN_BACKEND', 'math')
    configure_kernels()  # the environment overrides the switches when they are set
    with caplog.at_level(logging.INFO, logger=attn_mod.__name__):
        for _ in range(3):
            attention(*_qkv(torch.float32, length=4))
    assert [r.getMessage().split(' (')[0] for r in caplog.records] == ['attention backend: math']


def test_auto_takes_math_for_half_precision_on_the_cpu_and_sdpa_for_fp32():
    """The measured choice (docs/kernels.md): SDPA is the slower CPU path in bf16, the faster one in fp32."""
    assert attention_backend('cpu', torch.bfloat16) == 'math'
    assert attention_backend('cpu', torch.float16) == 'math'
    assert attention_backend('cpu', torch.float32) == 'sdpa'
