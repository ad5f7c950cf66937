"""Random erasing of normalized batches (docs/spec.md section 9), with its own generator keyed by the batch's
position, so the draws depend neither on the device nor on where a run resumed."""

from __future__ import annotations

import math

import torch

from ...seeds import erasing_seed
from .recipe import ERASE_LOG_RATIO, ERASE_P
from .upload import upload


def random_erasing(
    img: torch.Tensor,
    gen: torch.Generator,
    p: float = ERASE_P,
    area=(0.02, 1 / 3),
    log_ratio=ERASE_LOG_RATIO,
) -> torch.Tensor:
    """In place on normalized float (N, 3, H, W): each sample with probability p gets one rectangle of per-pixel
    standard normal noise (timm RandomErasing mode='pixel', the official 'rand' mode). `gen` is a CPU generator
    keyed by the batch position, so the draws do not depend on the device or on resume."""
    n, c, h, w = img.shape
    for i in range(n):
        if torch.rand((), generator=gen).item() >= p:
            continue
        for _ in range(10):
            target = h * w * (area[0] + (area[1] - area[0]) * torch.rand((), generator=gen).item())
            ratio = math.exp(log_ratio[0] + (log_ratio[1] - log_ratio[0]) * torch.rand((), generator=gen).item())
            eh, ew = int(round(math.sqrt(target * ratio))), int(round(math.sqrt(target / ratio)))
            if eh < h and ew < w:
                top = int(torch.randint(0, h - eh + 1, (), generator=gen))
                left = int(torch.randint(0, w - ew + 1, (), generator=gen))
                noise = torch.randn((c, eh, ew), generator=gen)
                img[i, :, top : top + eh, left : left + ew] = upload(noise, img.device, img.dtype)
                break
    return img


def batch_generator(seed: int, epoch: int, rank: int, batch: int) -> torch.Generator:
    """The erasing stream of one batch of one rank."""
    return torch.Generator().manual_seed(erasing_seed(seed, epoch, rank, batch))
