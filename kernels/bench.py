"""Kernel benchmark: `python -m cmae_ds.kernels.bench [--ops recon_loss ema visible_embed] [--out FILE]`.

On a GPU each op runs three ways, fused (the Triton kernel), reference (plain PyTorch) and torch.compile of the
reference, forward + backward where the op is trained. Time is the median of many runs measured with CUDA events,
with inputs rotated over enough copies to overflow L2 so the cache does not flatter; GB/s counts the bytes the op
must move at minimum and is compared with the measured device-to-device copy bandwidth.
On the CPU it only checks the fused kernels against the references (set TRITON_INTERPRET=1 to run Triton).
"""

import argparse
import datetime
import os
import statistics
import sys

import torch

from ._switch import last_impl
from .ema import FlatEMA, ema_flat_reference
from .recon_loss import recon_loss, recon_loss_reference
from .visible_embed import gather_visible, gather_visible_reference

L2_BYTES = 50 * 2**20 * 2  # twice the largest L2 we run on (H100/H200: 50 MB)


def _time_cuda(fn, inputs, iters):
    """Median milliseconds of fn(*inputs[i % len(inputs)]), each call between its own pair of CUDA events."""
    for i in range(3):
        fn(*inputs[i % len(inputs)])
    torch.cuda.synchronize()
    events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(iters)]
    for i, (start, end) in enumerate(events):
        start.record()
        fn(*inputs[i % len(inputs)])
        end.record()
    torch.cuda.synchronize()
    return statistics.median(s.elapsed_time(e) for s, e in events)


def copy_bandwidth_gbs(nbytes=2**30, iters=50):
    """Device copy bandwidth: bytes read + written by dst.copy_(src), per second."""
    src = torch.empty(nbytes // 4, device='cuda', dtype=torch.float32)
    dst = torch.empty_like(src)
    ms = _time_cuda(lambda: dst.copy_(src), [()], iters)
    return 2 * nbytes / ms / 1e6


def _copies(make, nbytes_each):
    return [make() for _ in range(max(2, -(-L2_BYTES // max(1, nbytes_each))))]


# Each case: (name, build(device, small) -> (list of input tuples, bytes moved), fused fn, reference fn).
def _recon_case(device, small, dtype=torch.bfloat16):
    n, grid, p = (2, 6, 4) if small else (256, 14, 16)
    keep_frac = 0.347  # CMAE ViT-B: 68 of 196 patches visible

    def make():
        img = torch.randn(n, 3, grid * p, grid * p, device=device, dtype=dtype)
        pred = torch.randn(n, grid * grid, p * p * 3, device=device, dtype=dtype, requires_grad=True)
        mask = torch.rand(n, grid * grid, device=device) > keep_frac
        return img, pred, mask, p

    elems = n * grid * grid * p * p * 3
    es = torch.finfo(dtype).bits // 8
    # minimum: image and pred of the hidden patches read once, the full gradient written once
    nbytes = elems * es * (2 * (1 - keep_frac) + 1)
    return ([make()] if small else _copies(make, elems * es * 3)), nbytes


def _recon_step(fn):
    def step(img, pred, mask, p):
        pred.grad = None
        fn(img, pred, mask, p).backward()

    return step


def _vit_b_shapes():
    """Parameter shapes of the EMA'd part of CMAE ViT-B/16: encoder (no final LN) + projector: 154 tensors, 87M."""
    d, hidden = 768, 3072
    block = [(3 * d, d), (3 * d,), (d, d), (d,), (hidden, d), (hidden,), (d, hidden), (d,), (d,), (d,), (d,), (d,)]
    projector = [(1536, d), (1536,), (1536,), (1536,), (256, 1536)]
    return [(d, 3, 16, 16), (d,), (1, 1, d)] + block * 12 + projector


def _ema_case(device, small, dtype=torch.bfloat16):
    sizes = [(7, 5), (13,), (300, 257)] if small else _vit_b_shapes()
    online = [torch.randn(s, device=device, dtype=dtype) for s in sizes]
    target = [torch.randn(s, device=device, dtype=torch.float32) for s in sizes]
    ema = FlatEMA(target, online)
    numel = ema.target_flat.numel()
    nbytes = numel * (4 + 4 + torch.finfo(dtype).bits // 8)  # read online and target, write target
    return [(ema,)], nbytes


def _visible_case(device, small, dtype=torch.bfloat16):
    n, num, d, keep = (2, 16, 24, 5) if small else (256, 196, 768, 68)

    def make():
        x = torch.randn(n, num, d, device=device, dtype=dtype, requires_grad=True)
        pos = torch.randn(1, num, d, device=device, dtype=dtype)
        ids = torch.argsort(torch.rand(n, num, device=device), dim=1)[:, :keep]
        return x, pos, ids

    es = torch.finfo(dtype).bits // 8
    # forward reads K rows and writes K rows; backward reads K rows and writes all L rows of grad_x
    nbytes = n * d * es * (3 * keep + num)
    return ([make()] if small else _copies(make, n * num * d * es * 2)), nbytes


def _visible_step(fn):
    def step(x, pos, ids):
        x.grad = None
        fn(x, pos, ids).sum().backward()

    return step


CASES = {
    'recon_loss': (_recon_case, _recon_step(recon_loss), _recon_step(recon_loss_reference), recon_loss_reference),
    'ema': (
        _ema_case,
        lambda e: e.update(0.996),
        lambda e: ema_flat_reference(e.target_flat, e.online_flat, 0.004),
        ema_flat_reference,
    ),
    'visible_embed': (
        _visible_case,
        _visible_step(gather_visible),
        _visible_step(gather_visible_reference),
        gather_visible_reference,
    ),
}


def _compiled_step(op):
    ref = CASES[op][3]
    compiled = torch.compile(ref)
    if op == 'ema':
        return lambda e: compiled(e.target_flat, e.online_flat, 0.004)
    return (_recon_step if op == 'recon_loss' else _visible_step)(compiled)


def bench_gpu(ops, iters):
    bw = copy_bandwidth_gbs()
    rows = []
    for op in ops:
        build, fused, ref, _ = CASES[op]
        inputs, nbytes = build('cuda', small=False)
        times = {'fused': _time_cuda(fused, inputs, iters), 'reference': _time_cuda(ref, inputs, iters)}
        try:
            times['compiled'] = _time_cuda(_compiled_step(op), inputs, iters)
        except Exception as e:  # report, do not hide the other numbers
            print(f'torch.compile failed for {op}: {e!r}', file=sys.stderr)
            times['compiled'] = float('nan')
        gbs = nbytes / times['fused'] / 1e6
        rows.append((op, times['fused'], times['reference'], times['compiled'], gbs, gbs / bw))
    return bw, rows


# The fused functions check() compares with the references (looked up when it runs, so a test can plant a wrong one).
FUSED = {'recon_loss': recon_loss, 'visible_embed': gather_visible}
REFERENCE = {'recon_loss': recon_loss_reference, 'visible_embed': gather_visible_reference}
# Largest error accepted, relative to the reference's largest magnitude: four bf16 ulps (2^-6) for the bf16 outputs
# and gradients, fp32 rounding for the EMA's fp32 target. A wrong kernel is off by far more (a wrong index, a
# dropped term): tests/test_kernels_bench.py plants one.
TOLERANCE = {'recon_loss': 2**-6, 'ema': 1e-5, 'visible_embed': 2**-6}


def _relative_error(got: list, want: list) -> float:
    return max(
        ((g.float() - w.float()).abs().max() / w.float().abs().max().clamp_min(1e-12)).item() for g, w in zip(got, want)
    )


def _value_and_grad(fn, args, leaf: torch.Tensor) -> list:
    leaf.grad = None
    out = fn(*args)
    out.float().sum().backward()
    return [out.detach(), leaf.grad.clone()]


def check(ops, device='cpu'):
    """Correctness: fused vs reference on small inputs, forward value and gradient. Returns {op: (impl that ran,
    error relative to the reference's largest magnitude)}; compare with TOLERANCE. On a GPU this is the compiled
    kernel's check (the test suite runs Triton only under its CPU interpreter)."""
    results = {}
    for op in ops:
        build = CASES[op][0]
        inputs, _ = build(device, small=True)
        if op == 'ema':
            ema = inputs[0][0]
            want = ema.target_flat.clone().lerp_(ema.online_flat.float(), 0.004)
            ema.update(0.996)
            results[op] = (last_impl('ema'), _relative_error([ema.target_flat], [want]))
            continue
        args = inputs[0]
        leaf = args[0] if op == 'visible_embed' else args[1]
        got = _value_and_grad(FUSED[op], args, leaf)
        impl = last_impl(op)
        results[op] = (impl, _relative_error(got, _value_and_grad(REFERENCE[op], args, leaf)))
    return results


def wrong_ops(results: dict) -> list[str]:
    """Ops whose error is over TOLERANCE (or NaN)."""
    return [op for op, (_, err) in results.items() if not err <= TOLERANCE[op]]


def _report(results: dict, where: str) -> None:
    for op, (impl, err) in results.items():
        verdict = 'ok' if err <= TOLERANCE[op] else 'WRONG'
        print(f'{op}: ran {impl}{where}, error vs reference {err:.3g} (tolerance {TOLERANCE[op]:.3g}): {verdict}')


def _markdown(bw, rows, command):
    card = torch.cuda.get_device_name()
    lines = [
        f'\n### {card}, {datetime.date.today()}, `{command}`',
        f'copy bandwidth: {bw:.0f} GB/s\n',
        '| op | fused ms | reference ms | compiled ms | fused GB/s | of copy bw |',
        '|---|---|---|---|---|---|',
    ]
    lines += [f'| {op} | {f:.3f} | {r:.3f} | {c:.3f} | {g:.0f} | {frac:.0%} |' for op, f, r, c, g, frac in rows]
    return '\n'.join(lines) + '\n'


def main(argv=None) -> int:
    """0 when every checked kernel is within TOLERANCE of its reference, 1 otherwise (the GPU timings still run and
    are written: a wrong kernel is named in the table)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--ops', nargs='+', default=list(CASES), choices=list(CASES))
    parser.add_argument('--iters', type=int, default=100)
    parser.add_argument('--out', help='append the GPU results table (markdown) to this file')
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        if os.environ.get('TRITON_INTERPRET') != '1':
            print('no GPU: Triton kernels run only with TRITON_INTERPRET=1; checking the references alone')
        results = check(args.ops)
        _report(results, '')
        return 1 if wrong_ops(results) else 0
    results = check(args.ops, 'cuda')
    _report(results, f' on {torch.cuda.get_device_name()}')
    wrong = wrong_ops(results)
    bw, rows = bench_gpu(args.ops, args.iters)
    table = _markdown(bw, rows, 'python -m cmae_ds.kernels.bench ' + ' '.join(argv or sys.argv[1:]))
    if wrong:
        table += f'\n**Wrong (error over tolerance): {", ".join(wrong)}**\n'
    print(table)
    if args.out:
        with open(args.out, 'a') as f:
            f.write(table)
    return 1 if wrong else 0


if __name__ == '__main__':
    sys.exit(main())
