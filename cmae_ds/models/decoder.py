"""MAE-style decoder used twice by CMAE: the pixel decoder and the feature decoder (docs/spec.md section 4)."""

from __future__ import annotations

import torch
from torch import nn

from .vit import LN_EPS, init_weights, make_blocks, sincos_pos_embed_2d


class MAEDecoder(nn.Module):
    """Visible tokens -> full grid with a shared mask token -> blocks -> per-patch prediction (cls dropped)."""

    def __init__(self, *, grid: int, in_dim: int, dim: int, depth: int, num_heads: int, mlp_ratio: float, out_dim: int):
        super().__init__()
        self.embed = nn.Linear(in_dim, dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.register_buffer('pos_embed', sincos_pos_embed_2d(grid, dim))
        self.blocks = make_blocks(dim, depth, num_heads, mlp_ratio)
        self.norm = nn.LayerNorm(dim, eps=LN_EPS)
        self.pred = nn.Linear(dim, out_dim)
        init_weights(self)
        nn.init.normal_(self.mask_token, std=0.02)

    def forward(self, latent: torch.Tensor, ids_keep: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """latent (N, 1 + K, D_enc) with cls first, ids_keep (N, K), mask (N, L) True = hidden -> (N, L, out_dim)."""
        x = self.embed(latent)  # (N, 1 + K, D)
        n, _, dim = x.shape
        full = x.new_zeros(n, mask.shape[1], dim)
        full = full.scatter(1, ids_keep.unsqueeze(-1).expand(-1, -1, dim), x[:, 1:])
        full = torch.where(mask.unsqueeze(-1), self.mask_token.to(x.dtype), full)  # (N, L, D)
        x = torch.cat([x[:, :1], full], dim=1) + self.pos_embed.to(x.dtype)
        x = self.norm(self.blocks(x))
        return self.pred(x)[:, 1:]
