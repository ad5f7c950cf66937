"""Vision Transformer pieces shared by the encoders, decoders and the classifier.

Parameter names follow timm's VisionTransformer (patch_embed.proj, blocks.i.norm1, attn.qkv, mlp.fc1, ...), so the
timm export is a rename-free copy; the official mmselfsup names are mapped in cmae_ds.modelfiles.formats.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from ..kernels import attention, gather_visible

LN_EPS = 1e-6


def sincos_pos_embed_2d(grid: int, dim: int, temperature: float = 10000.0) -> torch.Tensor:
    """Fixed 2-D sin-cos position embedding with a zero cls row: (1, 1 + grid*grid, dim).

    Same layout as the official (mmselfsup) code: [sin(r w), cos(r w), sin(c w), cos(c w)] with r the patch row and
    c the column, so official checkpoints and fresh models agree.
    """
    assert dim % 4 == 0, dim
    rows, cols = torch.meshgrid(
        torch.arange(grid, dtype=torch.float32), torch.arange(grid, dtype=torch.float32), indexing='ij'
    )
    quarter = dim // 4
    omega = 1.0 / temperature ** (torch.arange(quarter, dtype=torch.float32) / quarter)
    out_r = rows.flatten()[:, None] * omega[None]
    out_c = cols.flatten()[:, None] * omega[None]
    emb = torch.cat([out_r.sin(), out_r.cos(), out_c.sin(), out_c.cos()], dim=1)
    return torch.cat([torch.zeros(1, dim), emb], dim=0)[None]


def interpolate_pos_embed(pos_embed: torch.Tensor, new_grid: int) -> torch.Tensor:
    """Resize a (1, 1 + g*g, D) position embedding to (1, 1 + new_grid**2, D); bicubic over the patch grid."""
    cls_row, grid_rows = pos_embed[:, :1], pos_embed[:, 1:]
    old_grid = math.isqrt(grid_rows.shape[1])
    if old_grid * old_grid != grid_rows.shape[1]:
        raise ValueError(f'position embedding with {grid_rows.shape[1]} patch rows is not a square grid')
    if old_grid == new_grid:
        return pos_embed
    dim = pos_embed.shape[-1]
    grid_rows = grid_rows.reshape(1, old_grid, old_grid, dim).permute(0, 3, 1, 2).float()
    grid_rows = F.interpolate(grid_rows, size=(new_grid, new_grid), mode='bicubic', align_corners=False)
    grid_rows = grid_rows.permute(0, 2, 3, 1).reshape(1, new_grid * new_grid, dim).to(pos_embed.dtype)
    return torch.cat([cls_row, grid_rows], dim=1)


def resize_pos_embed(state: dict, key: str, grid: int) -> dict:
    """In place: the state dict's position embedding at `key` resized to `grid` when it was made for another
    resolution (fine-tuning or probing at 384/448 from a 224 pretraining). Returns the state dict."""
    pos = state.get(key)
    if pos is not None and pos.shape[1] != grid * grid + 1:
        state[key] = interpolate_pos_embed(pos, grid)
    return state


class PatchEmbed(nn.Module):
    def __init__(self, patch_size: int, in_chans: int, dim: int):
        super().__init__()
        self.patch_size = patch_size
        self.proj = nn.Conv2d(in_chans, dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, img: torch.Tensor) -> torch.Tensor:
        """(N, C, H, W) -> (N, L, D), patches in row-major grid order."""
        return self.proj(img).flatten(2).transpose(1, 2)


class Attention(nn.Module):
    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, dim * 3)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, length, dim = x.shape
        qkv = self.qkv(x).reshape(n, length, 3, self.num_heads, dim // self.num_heads).permute(2, 0, 3, 1, 4)
        # unbind: one backward writing the three slices, not three SelectBackwards each zeroing a full-size gradient
        out = attention(*qkv.unbind(0))  # (N, H, L, Dh); FA3 / FA2 / SDPA / math by cmae_ds.kernels
        return self.proj(out.transpose(1, 2).reshape(n, length, dim))


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


def drop_path_keep(x: torch.Tensor, p: float) -> torch.Tensor:
    """Stochastic depth's per-sample factor (N, 1, ..., 1): 0 for a dropped residual branch, 1/(1-p) for a kept one.

    Drawn by the caller of a block, outside a compiled block: a rate read inside it would be a Python constant that
    dynamo guards on, and twelve blocks with twelve rates would be twelve graphs (the recompile limit is 8)."""
    keep = 1.0 - p
    return x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep).div_(keep)


def _scaled(branch: torch.Tensor, keep: Optional[torch.Tensor]) -> torch.Tensor:
    return branch if keep is None else branch * keep.to(branch.dtype)


class Block(nn.Module):
    """Pre-norm transformer block: x + attn(LN(x)), then x + mlp(LN(x))."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float, drop_path: float = 0.0):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=LN_EPS)
        self.attn = Attention(dim, num_heads)
        self.norm2 = nn.LayerNorm(dim, eps=LN_EPS)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        self.drop_path = drop_path

    def forward(
        self, x: torch.Tensor, attn_keep: Optional[torch.Tensor] = None, mlp_keep: Optional[torch.Tensor] = None
    ) -> torch.Tensor:
        """attn_keep, mlp_keep: the branches' stochastic-depth factors (`drop_path_keep`), None for none."""
        x = x + _scaled(self.attn(self.norm1(x)), attn_keep)
        return x + _scaled(self.mlp(self.norm2(x)), mlp_keep)


class Blocks(nn.ModuleList):
    """A stack of blocks that can recompute each block in backward instead of storing its activations."""

    checkpointing: bool = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self:
            # timm's draws, in its order (attention's then the MLP's, none at rate 0), made here: see drop_path_keep
            drop = self.training and block.drop_path > 0
            keeps = (drop_path_keep(x, block.drop_path), drop_path_keep(x, block.drop_path)) if drop else ()
            if self.checkpointing and self.training and torch.is_grad_enabled():
                # Non-reentrant: works with inputs that do not require grad and with ZeRO-3's parameter hooks.
                x = checkpoint(block, x, *keeps, use_reentrant=False)
            else:
                x = block(x, *keeps)
        return x


def make_blocks(dim: int, depth: int, num_heads: int, mlp_ratio: float, drop_path: float = 0.0) -> Blocks:
    # Linearly increasing stochastic depth; plain Python so that building on the meta device works.
    rates = [drop_path * i / (depth - 1) for i in range(depth)] if depth > 1 else [drop_path] * depth
    return Blocks([Block(dim, num_heads, mlp_ratio, rate) for rate in rates])


def init_weights(module: nn.Module) -> None:
    """MAE initialization: xavier-uniform linears (and the patch conv as a linear), zero biases, unit LayerNorms.
    The patch conv's bias keeps nn.Conv2d's default, U(+-1/sqrt(fan_in)), as in the official CMAEViT and MAEViT,
    whose init_weights re-initialize only the conv's weight."""
    for m in module.modules():
        if isinstance(m, nn.Linear):
            nn.init.xavier_uniform_(m.weight)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, PatchEmbed):
            nn.init.xavier_uniform_(m.proj.weight.view(m.proj.weight.shape[0], -1))
            bound = 1 / math.sqrt(m.proj.weight[0].numel())
            nn.init.uniform_(m.proj.bias, -bound, bound)


class ViTEncoder(nn.Module):
    """ViT encoder: patch embedding, cls token, position embedding, pre-norm blocks, optional final LayerNorm.

    The position embedding is a fixed sin-cos buffer for pretraining (`learned_pos=False`) and a trained parameter
    for fine-tuning. It is persistent state either way, because official checkpoints carry their own values.
    """

    def __init__(
        self,
        *,
        img_size: int,
        patch_size: int,
        in_chans: int,
        dim: int,
        depth: int,
        num_heads: int,
        mlp_ratio: float,
        drop_path: float = 0.0,
        final_norm: bool = True,
        learned_pos: bool = False,
    ):
        super().__init__()
        self.patch_size = patch_size
        self.grid = img_size // patch_size
        self.patch_embed = PatchEmbed(patch_size, in_chans, dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        pos = sincos_pos_embed_2d(self.grid, dim)
        if learned_pos:
            self.pos_embed = nn.Parameter(pos)
        else:
            self.register_buffer('pos_embed', pos)
        self.blocks = make_blocks(dim, depth, num_heads, mlp_ratio, drop_path)
        self.norm = nn.LayerNorm(dim, eps=LN_EPS) if final_norm else nn.Identity()
        init_weights(self)
        nn.init.normal_(self.cls_token, std=0.02)

    def _with_cls(self, x: torch.Tensor) -> torch.Tensor:
        cls = (self.cls_token + self.pos_embed[:, :1]).expand(x.shape[0], -1, -1)
        return torch.cat([cls.to(x.dtype), x], dim=1)

    def forward_visible(self, img: torch.Tensor, ids_keep: torch.Tensor) -> torch.Tensor:
        """Encode only the visible patches. img (N, C, H, W), ids_keep (N, K) -> (N, 1 + K, D), cls first."""
        x = self.patch_embed(img)  # (N, L, D)
        x = gather_visible(x, self.pos_embed[:, 1:].to(x.dtype), ids_keep)  # (N, K, D) incl. position
        return self.norm(self.blocks(self._with_cls(x)))

    def forward(self, img: torch.Tensor) -> torch.Tensor:
        """Encode every patch. (N, C, H, W) -> (N, 1 + L, D), cls first."""
        x = self.patch_embed(img) + self.pos_embed[:, 1:].to(img.dtype)
        return self.norm(self.blocks(self._with_cls(x)))


def official_mae_init(encoder: ViTEncoder) -> None:
    """The official MAE baseline's encoder MLP biases: normal(std 1e-6), from mmcls' TransformerEncoderLayer
    init_weights, which MAEViT keeps (CMAEViT re-zeroes every linear bias)."""
    for block in encoder.blocks:
        nn.init.normal_(block.mlp.fc1.bias, std=1e-6)
        nn.init.normal_(block.mlp.fc2.bias, std=1e-6)


def build_encoder(
    cfg, *, final_norm: bool, learned_pos: bool = False, drop_path: float = 0.0, img_size: Optional[int] = None
) -> ViTEncoder:
    """The encoder of a ModelConfig `cfg` (at `img_size` when given, else cfg.img_size)."""
    return ViTEncoder(
        img_size=img_size or cfg.img_size,
        patch_size=cfg.patch_size,
        in_chans=cfg.in_chans,
        dim=cfg.embed_dim,
        depth=cfg.depth,
        num_heads=cfg.num_heads,
        mlp_ratio=cfg.mlp_ratio,
        drop_path=drop_path,
        final_norm=final_norm,
        learned_pos=learned_pos,
    )
