"""Triton gather of the visible patch embeddings plus position embedding, and the scatter of its gradient.

Forward reads only the K kept rows of x (any strides: the patch-embedding output is often a transposed view, and
copying it would read and write all L rows). Backward runs one program per (patch l, D-block) over an inverse
index map inv[n, l] = k (-1 where hidden): it writes grad_x[:, l] completely (zeros where hidden, so no separate
memset) and sums grad_pos[l] over the batch in registers: no atomics, deterministic.
Precondition: the indices in each row of ids_keep are distinct (what masking produces).
"""

import torch
import triton
import triton.language as tl

from .._triton import is_interpreted, next_pow2


@triton.jit
def _gather_fwd_kernel(
    x_ptr, pos_ptr, ids_ptr, out_ptr, NK, K, D, sxn, sxl, sxd, spl, spd, BLOCK_D: tl.constexpr, ROWS: tl.constexpr
):
    row = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)  # n * K + k
    row_ok = row < NK
    d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    ok = row_ok[:, None] & (d < D)[None, :]
    src = tl.load(ids_ptr + row, mask=row_ok, other=0)  # (ROWS,) int64 patch index
    x_off = (row // K * sxn + src * sxl)[:, None] + (d * sxd)[None, :]
    xv = tl.load(x_ptr + x_off, mask=ok, other=0.0).to(tl.float32)
    pv = tl.load(pos_ptr + (src * spl)[:, None] + (d * spd)[None, :], mask=ok, other=0.0).to(tl.float32)
    tl.store(out_ptr + (row * D)[:, None] + d[None, :], (xv + pv).to(out_ptr.dtype.element_ty), mask=ok)


@triton.jit
def _gather_bwd_kernel(
    g_ptr,
    inv_ptr,
    gx_ptr,
    gpos_ptr,
    N,
    L,
    K,
    D,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    GRAD_X: tl.constexpr,
    GRAD_POS: tl.constexpr,
):
    l = tl.program_id(0).to(tl.int64)
    d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    d_ok = d < D
    acc = tl.zeros([BLOCK_D], dtype=tl.float32)
    # BLOCK_N samples per step: the inverse-map load and the row loads of a step are independent, so a step costs
    # one round of memory latency instead of one per sample.
    for n0 in range(0, N, BLOCK_N):
        n = n0 + tl.arange(0, BLOCK_N).to(tl.int64)
        n_ok = n < N
        k = tl.load(inv_ptr + n * L + l, mask=n_ok, other=-1).to(tl.int64)  # (BLOCK_N,)
        vis = (k >= 0)[:, None] & d_ok[None, :]
        g = tl.load(g_ptr + ((n * K + k) * D)[:, None] + d[None, :], mask=vis, other=0.0).to(tl.float32)
        if GRAD_X:
            tl.store(
                gx_ptr + ((n * L + l) * D)[:, None] + d[None, :],
                g.to(gx_ptr.dtype.element_ty),
                mask=n_ok[:, None] & d_ok[None, :],
            )
        if GRAD_POS:
            acc += tl.sum(g, axis=0)
    if GRAD_POS:
        tl.store(gpos_ptr + l * D + d, acc.to(gpos_ptr.dtype.element_ty), mask=d_ok)


KERNEL = _gather_fwd_kernel


def _tiles(n: int, d: int):
    """(BLOCK_D, ROWS / BLOCK_N): ~4K-element tiles on the GPU; big ones in the interpreter, which pays per program."""
    if is_interpreted(_gather_fwd_kernel):
        block_d = next_pow2(d)
        return block_d, max(1, min(next_pow2(n), (1 << 16) // block_d))
    block_d = min(next_pow2(d), 256)
    return block_d, max(1, 4096 // block_d)


def gather_visible_fwd(x: torch.Tensor, pos: torch.Tensor, ids_keep: torch.Tensor) -> torch.Tensor:
    """x (N, L, D) any strides, pos (1, L, D), ids_keep (N, K) -> (N, K, D) in the promoted dtype."""
    n, _, d = x.shape
    k = ids_keep.shape[1]
    ids = ids_keep.to(torch.int64).contiguous()
    out = torch.empty(n, k, d, device=x.device, dtype=torch.promote_types(x.dtype, pos.dtype))
    block_d, rows = _tiles(n * k, d)
    grid = (triton.cdiv(n * k, rows), triton.cdiv(d, block_d))
    _gather_fwd_kernel[grid](
        x,
        pos,
        ids,
        out,
        n * k,
        k,
        d,
        x.stride(0),
        x.stride(1),
        x.stride(2),
        pos.stride(1),
        pos.stride(2),
        BLOCK_D=block_d,
        ROWS=rows,
        num_warps=4,
    )
    return out


def gather_visible_bwd(
    grad_out: torch.Tensor, ids_keep: torch.Tensor, num_patches: int, x_dtype, pos_dtype, need_x: bool, need_pos: bool
):
    """grad_out (N, K, D) -> (grad_x (N, L, D) or None, grad_pos (1, L, D) or None)."""
    n, k, d = grad_out.shape
    g = grad_out.contiguous()
    inv = torch.full((n, num_patches), -1, device=g.device, dtype=torch.int32)
    inv.scatter_(1, ids_keep.to(torch.int64), torch.arange(k, device=g.device, dtype=torch.int32).expand(n, k))
    grad_x = torch.empty(n, num_patches, d, device=g.device, dtype=x_dtype) if need_x else None
    grad_pos = torch.empty(1, num_patches, d, device=g.device, dtype=pos_dtype) if need_pos else None
    block_d, block_n = _tiles(n, d)
    block_n = min(block_n, 16) if not is_interpreted(_gather_bwd_kernel) else block_n
    grid = (num_patches, triton.cdiv(d, block_d))
    _gather_bwd_kernel[grid](
        g,
        inv,
        grad_x if need_x else g,
        grad_pos if need_pos else g,
        n,
        num_patches,
        k,
        d,
        BLOCK_N=block_n,
        BLOCK_D=block_d,
        GRAD_X=need_x,
        GRAD_POS=need_pos,
        num_warps=4,
    )
    return grad_x, grad_pos


class GatherVisibleFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, pos, ids_keep):
        ctx.save_for_backward(ids_keep)
        ctx.meta = (x.shape[1], x.dtype, pos.dtype)
        return gather_visible_fwd(x.detach(), pos.detach(), ids_keep)

    @staticmethod
    def backward(ctx, grad_out):
        (ids_keep,) = ctx.saved_tensors
        num_patches, x_dtype, pos_dtype = ctx.meta
        need_x, need_pos = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        if not (need_x or need_pos):
            return None, None, None
        grad_x, grad_pos = gather_visible_bwd(grad_out, ids_keep, num_patches, x_dtype, pos_dtype, need_x, need_pos)
        return grad_x, grad_pos, None


def gather_visible_triton(x, pos, ids_keep):
    return GatherVisibleFn.apply(x, pos, ids_keep)
