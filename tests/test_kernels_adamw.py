"""Every AdamW backend that can be built here vs torch's plain AdamW (foreach=False) over several steps."""

import importlib.util
import os

import pytest
import torch

from cmae_ds.kernels import build_adamw, last_impl
from cmae_ds.kernels import configure as configure_kernels
from cmae_ds.kernels.optim import BUILDERS, BackendUnavailable, jit_ops

LR, BETAS, EPS = 1e-2, (0.9, 0.95), 1e-8
# DeepSpeed JIT-builds these ops with a C++ compiler the first time (minutes each on 2 cores): a fresh machine
# would blow the suite's time budget, so they run when already built (prebuilt or cached) or when asked to.
JIT_OPS = {'deepspeed_fused': 'fused_adam', 'deepspeed_cpu': 'cpu_adam'}


def _jit_op_ready(op: str) -> bool:
    if os.environ.get('CMAE_TEST_JIT_OPS') == '1':
        return True
    if importlib.util.find_spec('deepspeed') is None:
        return True  # the builder reports deepspeed missing at once
    return jit_ops.is_built(op)


def _device(name: str) -> torch.device:
    """Where the backend's parameters live in training. DeepSpeed's fused_adam op is built for DeepSpeed's
    accelerator (CUDA on a GPU machine, its CPU variant here) and FusedAdam.step hands the tensors to the op without
    checking their device (deepspeed/ops/adam/fused_adam.py): CPU parameters on a GPU machine fail inside
    multi_tensor_apply. apex and torch's fused kernel run on CUDA when there is one."""
    if name == 'deepspeed_fused' and importlib.util.find_spec('deepspeed') is not None:
        from deepspeed.accelerator import get_accelerator

        return torch.device(get_accelerator().device_name())
    if name in ('apex', 'torch_fused') and torch.cuda.is_available():
        return torch.device('cuda')
    return torch.device('cpu')


def _model_params(device='cpu'):
    gen = torch.Generator().manual_seed(1)
    return [torch.randn(s, generator=gen).to(device) for s in [(7, 5), (13,), (3, 4, 5), (6,)]]


def _groups(params):
    # docs/spec.md section 8: decay on weights, none on biases/norms; extra keys must survive.
    return [
        {'params': params[:2], 'weight_decay': 0.05, 'lr_scale': 0.5},
        {'params': params[2:], 'weight_decay': 0.0, 'lr_scale': 1.0},
    ]


def _run(make_opt, steps=5, device='cpu'):
    params = [torch.nn.Parameter(p.clone()) for p in _model_params(device)]
    opt = make_opt(_groups(params))
    gen = torch.Generator().manual_seed(2)
    for _ in range(steps):
        for p in params:
            p.grad = torch.randn(p.shape, generator=gen).to(device)
        opt.step()
    return opt, [p.detach().cpu() for p in params]


def _reference():
    return _run(lambda g: torch.optim.AdamW(g, lr=LR, betas=BETAS, eps=EPS, foreach=False, fused=False))[1]


@pytest.mark.parametrize('name', list(BUILDERS))
def test_backend_matches_torch_adamw(name):
    if name in JIT_OPS and not _jit_op_ready(JIT_OPS[name]):
        pytest.skip(f'DeepSpeed op {JIT_OPS[name]} is not built yet; CMAE_TEST_JIT_OPS=1 builds it (minutes)')
    device = _device(name)
    try:
        opt, params = _run(lambda g: build_adamw(g, LR, BETAS, EPS, backend=name)[0], device=device)
    except BackendUnavailable as e:
        pytest.skip(f'{name} unavailable here: {e}')
    assert all(p.device.type == device.type for g in opt.param_groups for p in g['params'])
    assert last_impl('adamw') == name
    assert [g['weight_decay'] for g in opt.param_groups] == [0.05, 0.0]
    assert [g['lr_scale'] for g in opt.param_groups] == [0.5, 1.0]
    for got, want in zip(params, _reference()):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_comparison_can_fail():
    """Decay applied to the wrong group moves the weights measurably."""
    _, params = _run(lambda g: torch.optim.AdamW([{**x, 'weight_decay': 0.5} for x in g], lr=LR, betas=BETAS))
    assert not all(torch.allclose(a, b, rtol=1e-5, atol=1e-6) for a, b in zip(params, _reference()))


def test_auto_on_cpu_is_torch_fused():
    opt, name = build_adamw(_groups([torch.nn.Parameter(p) for p in _model_params()]), LR, BETAS)
    assert name == 'torch_fused' and opt.defaults['fused'] is True


def test_offload_prefers_deepspeed_cpu():
    params = [torch.nn.Parameter(p) for p in _model_params()]
    if not _jit_op_ready('cpu_adam'):
        pytest.skip('DeepSpeed op cpu_adam is not built yet; CMAE_TEST_JIT_OPS=1 builds it (minutes)')
    _, name = build_adamw(_groups(params), LR, BETAS, offload=True)
    assert name in ('deepspeed_cpu', 'torch_foreach')  # foreach only if the op cannot be built at all
    if importlib.util.find_spec('deepspeed') is not None:
        assert name == 'deepspeed_cpu'


@pytest.mark.parametrize('var', ['CMAE_FUSED', 'CMAE_FUSED_ADAMW'])
def test_switch_gives_plain_torch(monkeypatch, var):
    monkeypatch.setenv(var, '0')
    configure_kernels()  # the environment overrides the switches when they are set
    opt, name = build_adamw(_groups([torch.nn.Parameter(p) for p in _model_params()]), LR, BETAS, offload=True)
    assert name == 'torch' and last_impl('adamw') == 'torch'
    assert not opt.defaults['foreach'] and not opt.defaults['fused']


def test_unknown_and_unavailable_backends_raise():
    params = [torch.nn.Parameter(p) for p in _model_params()]
    with pytest.raises(ValueError, match='unknown AdamW backend'):
        build_adamw(params, LR, BETAS, backend='lamb')
    with pytest.raises(BackendUnavailable, match='apex'):
        build_adamw(params, LR, BETAS, backend='apex')  # apex needs CUDA parameters
