"""Triton reconstruction loss: one pass over the hidden patches gives the loss and/or its gradient w.r.t. pred.

Each program takes ROWS patches: the image is read straight from (N, 3, H, W) by index arithmetic (no patchify
copy), the per-patch mean and unbiased variance are reduced in registers, and the gradient
g * 2 * m * (pred - target) / (P * M) is written in the same pass. Visible patches (m == 0) load nothing and store
zeros. Everything accumulates in fp32.

Under autograd the forward pass only reads (loss), and backward recomputes the statistics and writes the gradient
already scaled by the incoming one. Saving a forward-computed gradient instead would cost a full write in forward
plus a read and a write to scale it in backward, more bytes than re-reading the hidden patches, and memory.
`recon_loss_and_grad` gives both in one pass for callers outside autograd.
"""

import torch
import triton
import triton.language as tl

from .._triton import is_interpreted, next_pow2
from .reference import NORM_EPS


@triton.jit
def _recon_loss_kernel(
    img_ptr,
    pred_ptr,
    mask_ptr,
    msum_ptr,
    gscale_ptr,
    loss_ptr,
    grad_ptr,
    NL,
    L,
    GW,
    H,
    W,
    eps,
    PATCH: tl.constexpr,
    P: tl.constexpr,
    BLOCK: tl.constexpr,
    ROWS: tl.constexpr,
    STORE_LOSS: tl.constexpr,
    COMPUTE_GRAD: tl.constexpr,
):
    # ROWS patches per program, one per tile row; int64 because N*L*P passes 2**31 at large batches.
    row = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)  # n * L + l
    row_ok = row < NL
    n = row // L
    l = row % L
    gy = l // GW
    gx = l % GW
    m = tl.load(mask_ptr + row, mask=row_ok, other=0.0)
    # Lanes follow the image's own order (channel, row, column) so image loads come in runs of PATCH elements;
    # pred's (row, column, channel) offsets are a permutation inside one contiguous patch.
    j = tl.arange(0, BLOCK)
    valid = (j < P)[None, :] & row_ok[:, None]
    ch = j // (PATCH * PATCH)
    r = (j // PATCH) % PATCH
    c = j % PATCH
    img_off = (
        ((n * 3)[:, None] + ch[None, :]) * H * W
        + ((gy * PATCH)[:, None] + r[None, :]) * W
        + (gx * PATCH)[:, None]
        + c[None, :]
    )
    pred_off = (row * P)[:, None] + ((r * PATCH + c) * 3 + ch)[None, :]
    live = tl.where(valid, m[:, None], 0.0) != 0.0  # hidden patches only: visible ones load nothing
    t = tl.load(img_ptr + img_off, mask=live, other=0.0).to(tl.float32)
    mean = tl.sum(t, axis=1) / P
    centered = tl.where(live, t - mean[:, None], 0.0)
    var = tl.sum(centered * centered, axis=1) / (P - 1)
    target = centered / tl.sqrt(var + eps)[:, None]
    x = tl.load(pred_ptr + pred_off, mask=live, other=0.0).to(tl.float32)
    diff = tl.where(live, x - target, 0.0)
    if STORE_LOSS:
        tl.store(loss_ptr + row, m * tl.sum(diff * diff, axis=1) / P, mask=row_ok)
    if COMPUTE_GRAD:
        msum = tl.load(msum_ptr)
        # msum == 0 means every m is 0: the gradient is 0; the divisor swap only avoids computing 0/0.
        scale = tl.load(gscale_ptr) * 2.0 * m / (P * tl.where(msum > 0.0, msum, 1.0))
        tl.store(grad_ptr + pred_off, (diff * scale[:, None]).to(grad_ptr.dtype.element_ty), mask=valid)


KERNEL = _recon_loss_kernel


def _rows_per_program(dim: int) -> int:
    # About 4K elements per program on the GPU; the interpreter pays per program, so it gets bigger tiles.
    budget = 1 << 16 if is_interpreted(_recon_loss_kernel) else 1 << 12
    return max(1, budget // next_pow2(dim))


def _check(img, pred, mask, p):
    n, c, h, w = img.shape
    if c != 3 or h % p or w % p:
        raise ValueError(f'img must be (N, 3, H, W) with H, W divisible by {p}, got {tuple(img.shape)}')
    num_patches, dim = (h // p) * (w // p), p * p * 3
    if pred.shape != (n, num_patches, dim) or mask.shape != (n, num_patches):
        raise ValueError(
            f'pred {tuple(pred.shape)} / mask {tuple(mask.shape)} do not match '
            f'({n}, {num_patches}, {dim}) / ({n}, {num_patches})'
        )


def _launch(img, pred, mask, p, store_loss: bool, grad_scale=None):
    """One kernel pass. Returns (loss or None, grad or None); grad_scale (0-dim tensor) requests the gradient."""
    _check(img, pred, mask, p)
    n, _, h, w = img.shape
    num_patches, dim = (h // p) * (w // p), p * p * 3
    img, pred = img.contiguous(), pred.contiguous()
    m = mask.reshape(-1).to(torch.float32).contiguous()
    msum = m.sum()  # stays on the device: the kernel reads it, no host sync
    per_patch = torch.empty(n * num_patches if store_loss else 1, device=pred.device, dtype=torch.float32)
    grad = torch.empty_like(pred) if grad_scale is not None else None
    gscale = grad_scale.to(device=pred.device, dtype=torch.float32) if grad_scale is not None else msum
    rows = _rows_per_program(dim)
    _recon_loss_kernel[(triton.cdiv(n * num_patches, rows),)](
        img,
        pred,
        m,
        msum,
        gscale,
        per_patch,
        grad if grad is not None else per_patch,
        n * num_patches,
        num_patches,
        w // p,
        h,
        w,
        NORM_EPS,
        PATCH=p,
        P=dim,
        BLOCK=next_pow2(dim),
        ROWS=rows,
        STORE_LOSS=store_loss,
        COMPUTE_GRAD=grad is not None,
        num_warps=8,
    )
    loss = per_patch.sum() / torch.where(msum > 0, msum, torch.ones_like(msum)) if store_loss else None
    return loss, grad


def recon_loss_and_grad(img: torch.Tensor, pred: torch.Tensor, mask: torch.Tensor, patch_size: int):
    """(loss fp32 scalar, d loss / d pred shaped and typed like pred) in one pass; no autograd involved."""
    one = torch.ones((), device=pred.device, dtype=torch.float32)
    return _launch(img.detach(), pred.detach(), mask, patch_size, store_loss=True, grad_scale=one)


class ReconLossFn(torch.autograd.Function):
    """Forward reads and reduces; backward re-reads the hidden patches and writes the scaled gradient."""

    @staticmethod
    def forward(ctx, img, pred, mask, patch_size):
        loss, _ = _launch(img.detach(), pred.detach(), mask, patch_size, store_loss=True)
        ctx.save_for_backward(img.detach(), pred.detach(), mask)
        ctx.patch_size = patch_size
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        img, pred, mask = ctx.saved_tensors
        grad_pred = None
        if ctx.needs_input_grad[1]:
            _, grad_pred = _launch(img, pred, mask, ctx.patch_size, store_loss=False, grad_scale=grad_loss)
        return None, grad_pred, None, None


def recon_loss_triton(img, pred, mask, patch_size):
    return ReconLossFn.apply(img, pred, mask, patch_size)
