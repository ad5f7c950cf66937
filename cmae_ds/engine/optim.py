"""AdamW parameter groups (docs/spec.md section 8) and optimizer construction."""
from __future__ import annotations

from torch import nn

from ..kernels.optim import build_adamw

# Official CMAE/MAE: no weight decay on norms, biases, position embeddings, the mask token and the cls token.
NO_DECAY_NAMES = ('pos_embed', 'cls_token', 'mask_token')


def no_weight_decay(name: str, param: nn.Parameter) -> bool:
    return param.ndim <= 1 or name.endswith('.bias') or name.split('.')[-1] in NO_DECAY_NAMES


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Two groups, decay and no decay, over the trainable parameters; names are kept for inspection."""
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        (no_decay if no_weight_decay(name, param) else decay).append((name, param))
    groups = []
    for members, wd in ((decay, weight_decay), (no_decay, 0.0)):
        if members:
            groups.append({'params': [p for _, p in members], 'names': [n for n, _ in members],
                           'weight_decay': wd, 'lr_scale': 1.0})
    return groups


def build_optimizer(groups: list[dict], *, lr: float, betas, backend: str, device, offload: bool):
    """(optimizer, name) from the fused-AdamW dispatcher (cmae_ds.kernels.optim); group options pass through."""
    clean = [{k: v for k, v in g.items() if k != 'names'} for g in groups]
    return build_adamw(clean, lr=lr, betas=tuple(betas), backend=backend, device=device, offload=offload)
