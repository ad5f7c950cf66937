"""Optimizers and their parameter groups: AdamW for pretraining and fine-tuning (docs/spec.md section 8), LARS or
SGD for linear probing (MAE's util/lars.py: batch 16384, lr 0.1 x 16384 / 256 = 6.4, no weight decay), and the
per-step lr."""

from __future__ import annotations

import torch
from torch import nn

from ..kernels.optim import build_adamw

# Official CMAE/MAE: no weight decay on norms, biases, position embeddings, the mask token and the cls token.
NO_DECAY_NAMES = ('pos_embed', 'cls_token', 'mask_token')


def no_weight_decay(name: str, param: nn.Parameter) -> bool:
    """Every tensor of at most one dimension, biases and the tokens: MAE's and timm's rule (fine-tuning)."""
    return param.ndim <= 1 or name.endswith('.bias') or name.split('.')[-1] in NO_DECAY_NAMES


def official_no_decay(model: nn.Module) -> set[str]:
    """The names the official pretraining configs exempt: their paramwise_cfg sets decay_mult 0 for names containing
    'ln', 'bias', 'pos_embed', 'mask_token' or 'cls_token' (substrings, mmengine's DefaultOptimWrapperConstructor).
    Every official LayerNorm is an `ln*` module and no other official name contains 'ln', so in our names that is
    every LayerNorm; the BatchNorm weights of the projector and predictor (`bn0`) are decayed."""
    out = set()
    for module_name, module in model.named_modules():
        for leaf, _ in module.named_parameters(recurse=False):
            name = f'{module_name}.{leaf}' if module_name else leaf
            if isinstance(module, nn.LayerNorm) or 'bias' in leaf or any(t in leaf for t in NO_DECAY_NAMES):
                out.add(name)
    return out


def param_groups(model: nn.Module, weight_decay: float, rule: str = 'official') -> list[dict]:
    """Two groups, decay and no decay, over the trainable parameters; names are kept for inspection. `rule`:
    'official' (official_no_decay) or 'one_dim' (no_weight_decay)."""
    exempt = official_no_decay(model) if rule == 'official' else None
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        skip = name in exempt if exempt is not None else no_weight_decay(name, param)
        (no_decay if skip else decay).append((name, param))
    groups = []
    for members, wd in ((decay, weight_decay), (no_decay, 0.0)):
        if members:
            groups.append(
                {
                    'params': [p for _, p in members],
                    'names': [n for n, _ in members],
                    'weight_decay': wd,
                    'lr_scale': 1.0,
                }
            )
    return groups


def build_optimizer(groups: list[dict], *, lr: float, betas, backend: str, device, offload: bool):
    """(optimizer, name) from the fused-AdamW dispatcher (cmae_ds.kernels.optim); group options pass through."""
    clean = [{k: v for k, v in g.items() if k != 'names'} for g in groups]
    return build_adamw(clean, lr=lr, betas=tuple(betas), backend=backend, device=device, offload=offload)


def undo_initial_step(engine) -> None:
    """DeepSpeed's ZeRO-0 bf16/fp16 optimizers (FP16_Optimizer, FP16_UnfusedOptimizer) create their state by one
    optimizer step on zero gradients when built: AdamW then decays the fp32 master weights once at the peak lr and
    counts a step no batch made, which puts every bias correction of the run one step ahead (ZeRO 1-3, fp32 and the
    official code start at step 0 from the initial weights). Both are put back: the masters from the module weights
    they were copied from, and an empty state, which the first real step creates."""
    optimizer = engine.optimizer
    if int(engine.zero_optimization_stage()) != 0 or not hasattr(optimizer, 'refresh_fp32_params'):
        return
    optimizer.refresh_fp32_params()
    optimizer.optimizer.state.clear()


def set_lr(optimizer, schedule, step: int, factor: float = 1.0) -> None:
    """Each group's rate at `step`: `schedule.lr(step, lr_scale)` (its own peak, the common floor), times `factor`."""
    for group in optimizer.param_groups:
        group['lr'] = schedule.lr(step, group.get('lr_scale', 1.0)) * factor


def probe_param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """The linear layer only; MAE's LARS skips 1-D parameters (the bias) for adaptation and weight decay itself."""
    params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    return [
        {
            'params': [p for _, p in params],
            'names': [n for n, _ in params],
            'weight_decay': weight_decay,
            'lr_scale': 1.0,
        }
    ]


class LARS(torch.optim.Optimizer):
    """MAE's LARS (util/lars.py): SGD with momentum where each matrix's update is rescaled by
    trust_coefficient x |w| / |g + wd w|; 1-D parameters (biases, norms) get plain momentum SGD, no weight decay."""

    def __init__(
        self,
        params,
        lr: float = 0.0,
        weight_decay: float = 0.0,
        momentum: float = 0.9,
        trust_coefficient: float = 0.001,
    ):
        super().__init__(
            params, dict(lr=lr, weight_decay=weight_decay, momentum=momentum, trust_coefficient=trust_coefficient)
        )

    @torch.no_grad()
    def step(self, closure=None):
        loss = closure() if closure is not None else None
        for group in self.param_groups:
            for p in group['params']:
                if p.grad is None:
                    continue
                update = p.grad
                if p.ndim > 1:
                    update = update.add(p, alpha=group['weight_decay'])
                    p_norm, u_norm = torch.norm(p), torch.norm(update)
                    one = torch.ones_like(p_norm)
                    trust = torch.where(
                        p_norm > 0, torch.where(u_norm > 0, group['trust_coefficient'] * p_norm / u_norm, one), one
                    )
                    update = update.mul(trust)
                mu = self.state[p].setdefault('mu', torch.zeros_like(p))
                mu.mul_(group['momentum']).add_(update)
                p.add_(mu, alpha=-group['lr'])
        return loss


def build_probe_optimizer(groups: list[dict], *, name: str, lr: float, momentum: float):
    """(optimizer, name): LARS as MAE, or SGD with momentum."""
    clean = [{k: v for k, v in g.items() if k != 'names'} for g in groups]
    if name == 'lars':
        return LARS(clean, lr=lr, momentum=momentum), 'lars'
    return torch.optim.SGD(clean, lr=lr, momentum=momentum), 'sgd'
