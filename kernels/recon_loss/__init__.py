"""Normalized-pixel reconstruction loss: `recon_loss(img, pred, mask, patch_size) -> fp32 scalar`.

Triton kernel (`fused.py`) on CUDA tensors or under TRITON_INTERPRET=1, else the reference (`reference.py`).
Switch: CMAE_FUSED_RECON_LOSS=0 (or CMAE_FUSED=0) forces the reference.
"""

import torch

from .._switch import record
from .._triton import load_fused
from .reference import patchify, recon_loss_reference

__all__ = ['recon_loss', 'recon_loss_and_grad', 'recon_loss_reference', 'patchify']


def recon_loss(img: torch.Tensor, pred: torch.Tensor, mask: torch.Tensor, patch_size: int) -> torch.Tensor:
    """img (N, 3, H, W), pred (N, L, p*p*3) in patchify layout, mask (N, L) True = hidden -> fp32 scalar.

    Differentiable w.r.t. pred only. mask.sum() == 0 gives 0 with a zero gradient.
    """
    fused = load_fused('recon_loss', __name__, img, pred)
    if fused is not None:
        record('recon_loss', 'triton')
        return fused.recon_loss_triton(img, pred, mask, patch_size)
    record('recon_loss', 'reference')
    return recon_loss_reference(img, pred, mask, patch_size)


def recon_loss_and_grad(img: torch.Tensor, pred: torch.Tensor, mask: torch.Tensor, patch_size: int):
    """Outside autograd: (fp32 scalar loss, d loss / d pred like pred), in one kernel pass when fused."""
    fused = load_fused('recon_loss', __name__, img, pred)
    if fused is not None:
        record('recon_loss', 'triton')
        return fused.recon_loss_and_grad(img, pred, mask, patch_size)
    record('recon_loss', 'reference')
    with torch.enable_grad():
        leaf = pred.detach().requires_grad_()
        loss = recon_loss_reference(img, leaf, mask, patch_size)
        (grad,) = torch.autograd.grad(loss, leaf)
    return loss.detach(), grad
