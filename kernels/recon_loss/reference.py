"""Normalized-pixel reconstruction loss, plain PyTorch: the specification (docs/spec.md section 5)."""

import torch

NORM_EPS = 1e-6


def patchify(img: torch.Tensor, p: int) -> torch.Tensor:
    """(N, 3, H, W) -> (N, L, p*p*3): patch-major (row-major grid), inside a patch (row, column, channel)."""
    n, c, h, w = img.shape
    x = img.reshape(n, c, h // p, p, w // p, p)
    x = torch.einsum('nchpwq->nhwpqc', x)
    return x.reshape(n, (h // p) * (w // p), p * p * c)


def recon_loss_reference(img: torch.Tensor, pred: torch.Tensor, mask: torch.Tensor, patch_size: int) -> torch.Tensor:
    """Mean over hidden patches of the per-patch MSE against the per-patch normalized image.

    img (N, 3, H, W), pred (N, L, p*p*3), mask (N, L) bool or float, True/1 = hidden. Returns an fp32 scalar,
    differentiable w.r.t. pred only. Computed in fp32 whatever the input dtype. With no hidden patch
    (mask.sum() == 0) the loss is 0 and its gradient is 0 (not NaN), so a degenerate batch cannot poison a step.
    """
    target = patchify(img.detach().float(), patch_size)
    mean = target.mean(dim=-1, keepdim=True)
    var = target.var(dim=-1, keepdim=True)  # unbiased, as the official code
    target = (target - mean) / (var + NORM_EPS) ** 0.5
    loss = ((pred.float() - target) ** 2).mean(dim=-1)  # (N, L)
    m = mask.to(torch.float32)
    msum = m.sum()
    # sum(loss * m) is exactly 0 when m is all zero, so dividing by 1 instead gives 0 and a zero gradient.
    return (loss * m).sum() / torch.where(msum > 0, msum, torch.ones_like(msum))
