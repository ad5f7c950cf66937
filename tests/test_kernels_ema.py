"""FlatEMA: one-launch Triton momentum update vs the fp32 lerp specification, fallbacks and switch."""

import copy
import os

os.environ['TRITON_INTERPRET'] = '1'  # before the first kernel is decorated: kernels are imported lazily

import pytest
import torch

from cmae_ds.kernels import FlatEMA, last_impl
from cmae_ds.kernels import configure as configure_kernels
from cmae_ds.kernels._triton import has_triton, is_interpreted

SHAPES = [(7, 5), (1,), (33,), (3, 4, 5), (300, 257)]  # odd sizes; the last spans several interpreter blocks


@pytest.fixture
def interpreted():
    if not has_triton():
        pytest.skip('triton is not installed')
    from cmae_ds.kernels.ema import fused

    assert is_interpreted(fused.KERNEL), 'the kernel was compiled before TRITON_INTERPRET=1 was set'


def _params(dtype):
    return [torch.nn.Parameter(torch.randn(s).to(dtype)) for s in SHAPES]


def _expected(target, online, m):
    return [m * t.float() + (1 - m) * o.float() for t, o in zip(target, online)]


@pytest.mark.parametrize('online_dtype', [torch.float32, torch.bfloat16])
def test_flat_update_matches_lerp(interpreted, online_dtype):
    online, target = _params(online_dtype), _params(torch.float32)
    ema = FlatEMA(target, online)
    assert ema.flat and ema.target_flat.dtype == torch.float32
    want = [t.detach().clone() for t in target]
    for m in [0.9, 0.996, 0.5]:
        for p in online:  # in place, as an optimizer step: the views stay views
            p.data.add_(torch.randn_like(p), alpha=0.1)
        ema.update(m)
        assert last_impl('ema') == 'triton'
        want = _expected(want, online, m)
    for t, w in zip(target, want):
        assert t.dtype == torch.float32
        torch.testing.assert_close(t.detach(), w, rtol=1e-6, atol=1e-6)


def test_repointed_module_still_runs(interpreted):
    online_net = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.LayerNorm(5), torch.nn.Linear(5, 3))
    target_net = copy.deepcopy(online_net)
    x = torch.randn(4, 6)
    before = online_net(x).detach()
    ema = FlatEMA(list(target_net.parameters()), list(online_net.parameters()))
    torch.testing.assert_close(online_net(x), before)
    torch.testing.assert_close(target_net(x), before)
    opt = torch.optim.SGD(online_net.parameters(), lr=0.1)
    online_net(x).square().sum().backward()
    opt.step()  # updates the flat buffer through the re-pointed parameters
    ema.update(0.0)  # m = 0: target becomes the online weights
    torch.testing.assert_close(target_net(x), online_net(x))


def test_bf16_online_moves_fp32_target_by_fp32_amount(interpreted):
    """With m = 0.996 the step is below bf16's resolution: only an fp32 target follows."""
    online = [torch.nn.Parameter(torch.full((64,), 1.0078125, dtype=torch.bfloat16))]  # 1 + 2**-7, exact in bf16
    target = [torch.nn.Parameter(torch.ones(64))]
    ema = FlatEMA(target, online)
    ema.update(0.996)
    want = 0.996 * 1.0 + 0.004 * 1.0078125
    assert torch.bfloat16 != target[0].dtype
    torch.testing.assert_close(target[0].detach(), torch.full((64,), want), rtol=0, atol=1e-7)
    assert torch.tensor(want).bfloat16().item() == 1.0  # a bf16 target would not have moved


def test_bf16_targets_keep_fp32_master(interpreted):
    online, target = _params(torch.bfloat16), _params(torch.bfloat16)
    ema = FlatEMA(target, online)
    assert ema.shadow_flat is not None and target[0].dtype == torch.bfloat16
    fp32 = [t.detach().float() for t in target]
    for _ in range(3):
        ema.update(0.996)
        fp32 = _expected(fp32, online, 0.996)
    for t, master, w in zip(target, ema.fp32_targets(), fp32):
        torch.testing.assert_close(master, w, rtol=1e-6, atol=1e-6)
        # One bf16 ulp: Triton's interpreter truncates fp32 -> bf16 where the GPU rounds to nearest even.
        torch.testing.assert_close(t.detach().float(), master, rtol=2**-7, atol=0)


def test_fallback_when_online_not_repointable(interpreted):
    online, target = _params(torch.bfloat16), _params(torch.float32)
    ema = FlatEMA(target, online, repoint_online=False)
    assert not ema.flat
    want = _expected([t.detach().clone() for t in target], online, 0.9)
    ema.update(0.9)
    assert last_impl('ema') == 'foreach_fallback'
    for t, w in zip(target, want):
        torch.testing.assert_close(t.detach(), w, rtol=1e-6, atol=1e-6)


def test_fallback_after_external_repoint_and_explicit_list(interpreted):
    online, target = _params(torch.float32), _params(torch.float32)
    ema = FlatEMA(target, online)
    for p in online:  # what an engine that flattens parameters itself would do
        p.data = p.data.clone()
    assert not ema.flat
    want = _expected([t.detach().clone() for t in target], online, 0.8)
    ema.update(0.8)
    assert last_impl('ema') == 'foreach_fallback'
    others = [torch.randn(s) for s in SHAPES]
    want = _expected(want, others, 0.7)
    ema.update(0.7, online=others)
    for t, w in zip(target, want):
        torch.testing.assert_close(t.detach(), w, rtol=1e-6, atol=1e-6)


def test_online_views_of_a_foreign_buffer_are_not_repointed(interpreted):
    """Like DeepSpeed ZeRO-1/2: the online weights are views of the engine's flat buffer, which it writes."""
    owner = torch.randn(sum(torch.Size(s).numel() for s in SHAPES))
    online, off = [], 0
    for s in SHAPES:
        online.append(owner[off : off + torch.Size(s).numel()].view(s))
        off += torch.Size(s).numel()
    target = _params(torch.float32)
    ema = FlatEMA(target, online)
    assert not ema.flat and online[0].data_ptr() == owner.data_ptr()
    owner.add_(1.0)  # the engine's step, seen through the untouched views
    want = _expected([t.detach().clone() for t in target], online, 0.9)
    ema.update(0.9)
    assert last_impl('ema') == 'foreach_fallback'
    for t, w in zip(target, want):
        torch.testing.assert_close(t.detach(), w, rtol=1e-6, atol=1e-6)


def test_moved_targets_raise(interpreted):
    online, target = _params(torch.float32), _params(torch.float32)
    ema = FlatEMA(target, online)
    target[0].data = target[0].data.clone()
    with pytest.raises(RuntimeError, match='re-pointed or moved'):
        ema.update(0.9)


def test_shape_mismatch_raises():
    with pytest.raises(ValueError, match='shape'):
        FlatEMA([torch.zeros(3)], [torch.zeros(4)])


@pytest.mark.parametrize('var', ['CMAE_FUSED', 'CMAE_FUSED_EMA'])
def test_ema_switch_routes_to_reference(interpreted, monkeypatch, var):
    online, target = _params(torch.bfloat16), _params(torch.float32)
    ema = FlatEMA(target, online)
    monkeypatch.setenv(var, '0')
    configure_kernels()  # the environment overrides the switches when they are set
    want = _expected([t.detach().clone() for t in target], online, 0.99)
    ema.update(0.99)
    assert last_impl('ema') == 'reference'
    for t, w in zip(target, want):
        torch.testing.assert_close(t.detach(), w, rtol=1e-6, atol=1e-6)
