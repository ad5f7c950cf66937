"""Fine-tuning / evaluation classifier (docs/spec.md section 9): encoder without final norm, mean-pooled patch tokens,
fc_norm, linear head. Same computation as timm's VisionTransformer with global_pool='avg'."""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from ..config import ModelConfig
from .vit import LN_EPS, build_encoder


class ViTClassifier(nn.Module):
    def __init__(self, cfg: ModelConfig, num_classes: int, *, drop_path: float = 0.0, img_size: Optional[int] = None):
        super().__init__()
        self.cfg = cfg
        self.num_classes = num_classes
        self.encoder = build_encoder(cfg, final_norm=False, learned_pos=True, drop_path=drop_path, img_size=img_size)
        self.fc_norm = nn.LayerNorm(cfg.embed_dim, eps=LN_EPS)
        self.head = nn.Linear(cfg.embed_dim, num_classes)
        nn.init.trunc_normal_(self.head.weight, std=2e-5)
        nn.init.zeros_(self.head.bias)

    def forward_features(self, img: torch.Tensor) -> torch.Tensor:
        """(N, C, H, W) -> (N, D): fc_norm of the mean patch token (cls excluded)."""
        return self.fc_norm(self.encoder(img)[:, 1:].mean(dim=1))

    def forward(self, img: torch.Tensor) -> torch.Tensor:
        """(N, C, H, W) -> logits (N, num_classes)."""
        return self.head(self.forward_features(img))
