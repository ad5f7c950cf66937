"""Linear probing's model (MAE's protocol, main_linprobe.py): a frozen pretrained encoder, then BatchNorm1d without
affine parameters and a linear layer; only the linear layer (and the BatchNorm statistics) train. Features = cls
token (or the mean patch token) after the encoder's final norm; head weight trunc-normal std 0.01."""

from __future__ import annotations

import torch
from torch import nn

from .vit import build_encoder


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


def build_probe(cfg, num_classes: int, *, pool: str = 'cls', img_size: int | None = None) -> LinearProbe:
    """An untrained LinearProbe of the right shapes (to load a saved probe into)."""
    return LinearProbe(build_encoder(cfg, final_norm=True, img_size=img_size), cfg.embed_dim, num_classes, pool)
