"""AdamW dispatch: DeepSpeed FusedAdam, apex FusedAdam, torch fused / foreach / plain AdamW, DeepSpeed CPU Adam.

All of them compute decoupled weight decay (AdamW) with bias correction, so they are interchangeable up to
rounding. Param groups are passed through as given: per-group weight_decay and any extra keys (e.g. lr_scale,
read by the lr schedule) stay in `optimizer.param_groups`.
"""

import logging
from typing import Callable, Dict, Iterable, List, Tuple

import torch

from .._switch import fused_enabled, record

log = logging.getLogger(__name__)
_logged = set()


class BackendUnavailable(RuntimeError):
    """The named AdamW backend cannot be built here; the message says why."""


def _deepspeed_fused(groups, device, **kw):
    try:
        from deepspeed.ops.adam import FusedAdam
    except Exception as e:  # deepspeed imports its accelerator and op builders: more than ImportError can surface
        raise BackendUnavailable(f'deepspeed is not importable: {e!r}') from e
    try:  # the constructor loads (JIT-builds, the first time) the fused_adam op for the current accelerator
        return FusedAdam(groups, adam_w_mode=True, bias_correction=True, **kw)
    except Exception as e:
        raise BackendUnavailable(f'DeepSpeed FusedAdam op could not be loaded: {e!r}') from e


def _apex(groups, device, **kw):
    if device.type != 'cuda':
        raise BackendUnavailable('apex FusedAdam needs CUDA parameters')
    try:
        from apex.optimizers import FusedAdam
    except Exception as e:
        raise BackendUnavailable(f'apex (with its CUDA extensions) is not installed: {e!r}') from e
    return FusedAdam(groups, adam_w_mode=True, bias_correction=True, **kw)


def _torch_fused(groups, device, **kw):
    try:
        return torch.optim.AdamW(groups, fused=True, **kw)
    except (RuntimeError, ValueError) as e:  # torch rejects devices/dtypes its fused kernel lacks
        raise BackendUnavailable(f'torch AdamW(fused=True) refused these parameters: {e}') from e


def _torch_foreach(groups, device, **kw):
    return torch.optim.AdamW(groups, foreach=True, **kw)


def _deepspeed_cpu(groups, device, **kw):
    try:
        from deepspeed.ops.adam import DeepSpeedCPUAdam
    except Exception as e:
        raise BackendUnavailable(f'deepspeed is not importable: {e!r}') from e
    try:  # JIT-builds the cpu_adam op the first time (minutes; cached in ~/.cache/torch_extensions)
        return DeepSpeedCPUAdam(groups, adamw_mode=True, bias_correction=True, **kw)
    except Exception as e:
        raise BackendUnavailable(f'DeepSpeed CPU Adam op could not be built: {e!r}') from e


def _torch(groups, device, **kw):
    return torch.optim.AdamW(groups, foreach=False, fused=False, **kw)


BUILDERS: Dict[str, Callable] = {
    'deepspeed_fused': _deepspeed_fused,
    'apex': _apex,
    'torch_fused': _torch_fused,
    'torch_foreach': _torch_foreach,
    'deepspeed_cpu': _deepspeed_cpu,
    'torch': _torch,
}


def auto_order(device: torch.device, offload: bool) -> List[str]:
    """Backends 'auto' tries, in order. CMAE_FUSED_ADAMW=0 (or CMAE_FUSED=0) gives the plain torch loop."""
    if not fused_enabled('adamw'):
        return ['torch']
    if offload:  # ZeRO-Offload steps on CPU partitions; DeepSpeed expects its own CPU Adam there
        return ['deepspeed_cpu', 'torch_foreach']
    if device.type == 'cuda':
        return ['deepspeed_fused', 'apex', 'torch_fused', 'torch_foreach']
    # Measured on a 2-core CPU over CMAE ViT-B's groups (docs/benchmarks.md): fused 48 ms a step, single-tensor 183,
    # foreach 359 (its many small sqrt/div launches); torch's fused kernel runs on CPUs since torch 2.4.
    return ['torch_fused', 'torch_foreach']


def _as_groups(param_groups) -> List[dict]:
    groups = list(param_groups)
    if groups and not isinstance(groups[0], dict):
        groups = [{'params': groups}]
    # Shallow copies with params as lists: the caller's dicts stay untouched, and a generator would be used up
    # by a backend that fails before 'auto' tries the next.
    return [dict(g, params=list(g['params'])) for g in groups]


def _first_device(groups) -> torch.device:
    for g in groups:
        for p in g['params']:
            return p.device
    return torch.device('cpu')


def build_adamw(
    param_groups: Iterable,
    lr: float,
    betas: Tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-8,
    backend: str = 'auto',
    device=None,
    offload: bool = False,
    weight_decay: float = 0.0,
):
    """Build an AdamW optimizer -> (optimizer, backend name).

    param_groups: dicts with 'params' and optionally 'weight_decay' and extra keys (kept), or a list of params.
    weight_decay: default for groups without their own. device: where the parameters live (default: the first
    parameter's device). offload: ZeRO offloads the optimizer to the CPU. backend: 'auto' or one of BUILDERS;
    an explicit name that cannot be built raises BackendUnavailable with the reason.
    """
    groups = _as_groups(param_groups)
    device = torch.device(device) if device is not None else _first_device(groups)
    kw = dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay)
    if backend != 'auto':
        if backend not in BUILDERS:
            raise ValueError(f"unknown AdamW backend {backend!r}; expected 'auto' or one of {', '.join(BUILDERS)}")
        return _finish(BUILDERS[backend](groups, device, **kw), backend)
    reasons = []
    for name in auto_order(device, offload):
        try:
            return _finish(BUILDERS[name](groups, device, **kw), name)
        except BackendUnavailable as e:
            log.info('AdamW backend %s skipped: %s', name, e)
            reasons.append(f'{name}: {e}')
    raise BackendUnavailable('no AdamW backend could be built:\n' + '\n'.join(reasons))


def _finish(optimizer, name: str):
    if name not in _logged:
        _logged.add(name)
        log.info('AdamW backend: %s', name)
    record('adamw', name)
    return optimizer, name
