"""Linear probing (MAE's protocol, main_linprobe.py): a frozen pretrained encoder, then BatchNorm1d without affine
parameters and a linear layer; only the linear layer (and the BatchNorm statistics) train, with LARS.

MAE: batch 16384, blr 0.1 (lr = 0.1 x 16384 / 256 = 6.4), weight decay 0, 90 epochs with 10 of warmup from 0, cosine
to 0, LARS (momentum 0.9, trust coefficient 0.001, no adaptation or weight decay for 1-D parameters), head weight
trunc-normal std 0.01, features = cls token after the encoder's final norm.
"""
from __future__ import annotations

import torch
from torch import nn

from ..checkpoint import encoder_state, load_strict
from ..config import ModelConfig
from ..models import interpolate_pos_embed
from ..models.cmae import build_encoder


class LinearProbe(nn.Module):
    """encoder (frozen, always in eval mode) -> pooled feature (N, D) -> BatchNorm1d(affine=False) -> Linear."""

    def __init__(self, encoder: nn.Module, embed_dim: int, num_classes: int, pool: str = 'cls'):
        super().__init__()
        self.encoder = encoder.requires_grad_(False)
        self.pool = pool
        self.head = nn.Sequential(nn.BatchNorm1d(embed_dim, affine=False, eps=1e-6), nn.Linear(embed_dim, num_classes))
        nn.init.trunc_normal_(self.head[1].weight, std=0.01)
        nn.init.zeros_(self.head[1].bias)

    def train(self, mode: bool = True):
        super().train(mode)
        self.encoder.eval()  # frozen: no drop path, identical features in training and evaluation
        return self

    def forward_features(self, img: torch.Tensor) -> torch.Tensor:
        """(N, C, H, W) -> (N, D), without a graph through the encoder."""
        with torch.no_grad():
            tokens = self.encoder(img)  # (N, 1 + L, D), final norm applied
            return tokens[:, 0] if self.pool == 'cls' else tokens[:, 1:].mean(dim=1)

    def forward(self, img: torch.Tensor) -> torch.Tensor:
        """(N, C, H, W) -> logits (N, num_classes)."""
        return self.head(self.forward_features(img))


def probe_from_pretrained(source, cfg: ModelConfig, num_classes: int, *, pool: str = 'cls',
                          img_size: int | None = None, trust: bool = False) -> LinearProbe:
    """A LinearProbe over the pretrained encoder (with its final norm) of any checkpoint that
    cmae_ds.checkpoint.encoder_state reads; the position embedding is resized when img_size differs."""
    encoder = build_encoder(cfg, final_norm=True, img_size=img_size)
    state = encoder_state(source, trust=trust)
    if 'pos_embed' in state and state['pos_embed'].shape[1] != encoder.grid ** 2 + 1:
        state['pos_embed'] = interpolate_pos_embed(state['pos_embed'], encoder.grid)
    load_strict(encoder, state, what='pretrained encoder', cfg=cfg)
    return LinearProbe(encoder, cfg.embed_dim, num_classes, pool)


def build_probe(cfg: ModelConfig, num_classes: int, *, pool: str = 'cls', img_size: int | None = None) -> LinearProbe:
    """An untrained LinearProbe of the right shapes (to load a saved probe into)."""
    return LinearProbe(build_encoder(cfg, final_norm=True, img_size=img_size), cfg.embed_dim, num_classes, pool)


def probe_param_groups(model: LinearProbe, weight_decay: float) -> list[dict]:
    """The linear layer only; MAE's LARS skips 1-D parameters (the bias) for adaptation and weight decay itself."""
    params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    return [{'params': [p for _, p in params], 'names': [n for n, _ in params], 'weight_decay': weight_decay,
             'lr_scale': 1.0}]


class LARS(torch.optim.Optimizer):
    """MAE's LARS (util/lars.py): SGD with momentum where each matrix's update is rescaled by
    trust_coefficient x |w| / |g + wd w|; 1-D parameters (biases, norms) get plain momentum SGD, no weight decay."""

    def __init__(self, params, lr: float = 0.0, weight_decay: float = 0.0, momentum: float = 0.9,
                 trust_coefficient: float = 0.001):
        super().__init__(params, dict(lr=lr, weight_decay=weight_decay, momentum=momentum,
                                      trust_coefficient=trust_coefficient))

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
                    trust = torch.where(p_norm > 0, torch.where(u_norm > 0,
                                                                group['trust_coefficient'] * p_norm / u_norm, one), one)
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
