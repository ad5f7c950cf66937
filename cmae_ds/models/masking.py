"""Masks over the patch grid. True = hidden. Every sample hides the same number of patches (docs/spec.md section 2)."""

from __future__ import annotations

from typing import Optional

import torch


def patchify(img: torch.Tensor, patch_size: int) -> torch.Tensor:
    """(N, C, H, W) -> (N, L, p*p*C); patch-major, inside a patch (row, column, channel) as the official code."""
    n, c, h, w = img.shape
    p = patch_size
    x = img.reshape(n, c, h // p, p, w // p, p)
    return torch.einsum('nchpwq->nhwpqc', x).reshape(n, (h // p) * (w // p), p * p * c)


def unpatchify(patches: torch.Tensor, patch_size: int, channels: int = 3) -> torch.Tensor:
    """(N, L, p*p*C) -> (N, C, H, W); the inverse of patchify."""
    n, length, _ = patches.shape
    g = int(length**0.5)
    p = patch_size
    x = patches.reshape(n, g, g, p, p, channels)
    return torch.einsum('nhwpqc->nchpwq', x).reshape(n, channels, g * p, g * p)


def _hide_all_but(noise: torch.Tensor, keep: int) -> torch.Tensor:
    """(N, M) noise -> (N, M) bool, True everywhere except the `keep` positions of smallest noise per row."""
    keep_ids = noise.argsort(dim=1)[:, :keep]
    hidden = torch.ones_like(noise, dtype=torch.bool)
    return hidden.scatter_(1, keep_ids, False)


def block_mask(
    batch: int, grid: int, mask_ratio: float, *, device=None, generator: Optional[torch.Generator] = None
) -> torch.Tensor:
    """CMAE masking: hide 2x2 blocks of patches. Keeps int(B * (1 - ratio)) of the B = (grid/2)^2 blocks.

    Returns (N, grid*grid) bool.
    """
    half = grid // 2
    num_blocks = half * half
    keep = int(num_blocks * (1 - mask_ratio))
    noise = torch.rand(batch, num_blocks, device=device, generator=generator)
    blocks = _hide_all_but(noise, keep).view(batch, half, 1, half, 1)
    return blocks.expand(batch, half, 2, half, 2).reshape(batch, grid * grid)


def patch_mask(
    batch: int, num_patches: int, mask_ratio: float, *, device=None, generator: Optional[torch.Generator] = None
) -> torch.Tensor:
    """MAE masking: hide int-rounded `mask_ratio` of the patches uniformly per sample. (N, L) bool."""
    keep = int(num_patches * (1 - mask_ratio))
    noise = torch.rand(batch, num_patches, device=device, generator=generator)
    return _hide_all_but(noise, keep)


def visible_ids(mask: torch.Tensor, num_visible: Optional[int] = None, check: bool = False) -> torch.Tensor:
    """(N, L) bool mask -> (N, K) int64 indices of the visible patches in grid order.

    `num_visible` skips a host sync when the caller knows it (`check`: a device-side assertion, which a compiled
    graph keeps, that every row has that many); otherwise the mask is checked to hide the same count in every row,
    which the encoder's fixed-length batch needs.
    """
    if mask.ndim != 2 or mask.dtype != torch.bool:
        raise ValueError(f'mask must be a (N, L) bool tensor, got {tuple(mask.shape)} {mask.dtype}')
    if num_visible is None:
        counts = (~mask).sum(dim=1)
        num_visible = int(counts[0])
        if not bool((counts == num_visible).all()):
            raise ValueError(f'every sample must hide the same number of patches; visible counts {counts.tolist()}')
    elif check:
        torch._assert_async(((~mask).sum(dim=1) == num_visible).all(), f'every sample must show {num_visible} patches')
    # A stable sort of 0 (visible) before 1 (hidden) lists visible patches in grid order.
    return torch.argsort(mask.to(torch.int8), dim=1, stable=True)[:, :num_visible]
