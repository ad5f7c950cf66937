"""CMAE losses (docs/spec.md section 5): pixel reconstruction on hidden patches and InfoNCE across the global batch."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..kernels import recon_loss
from .collectives import gather_no_grad, world


def reconstruction_loss(img: torch.Tensor, pred: torch.Tensor, mask: torch.Tensor, patch_size: int) -> torch.Tensor:
    """Mean squared error against per-patch normalized pixels, averaged over hidden patches.

    img (N, C, H, W), pred (N, L, p*p*C), mask (N, L) True = hidden. Normalization uses the unbiased variance and
    eps 1e-6 like the official code; fp32 whatever the input dtype. The fused kernel (one pass over the image) or
    its PyTorch reference, as cmae_ds.kernels.recon_loss decides; 0 when nothing is hidden.
    """
    return recon_loss(img, pred, mask, patch_size)


def contrastive_loss(online: torch.Tensor, target: torch.Tensor, temperature: float) -> torch.Tensor:
    """InfoNCE of online (N, d) against the targets (N, d) of every rank, both L2-normalized here.

    The positive of local sample i is global row rank * N + i; every other row of the global batch is a negative.
    Scaled by 2 * temperature as the official code does.
    """
    q = F.normalize(online.float(), dim=1)
    k = gather_no_grad(F.normalize(target.float(), dim=1))  # (world * N, d)
    rank, _ = world()
    logits = q @ k.t() / temperature
    labels = torch.arange(q.shape[0], device=q.device) + rank * q.shape[0]
    return 2 * temperature * F.cross_entropy(logits, labels)
