"""What model.compile=blocks costs (the first calls: tracing and compiling) and gains (the step after) per task, on
this machine, eager against compiled, one process, no DeepSpeed (the model and torch's AdamW only):

    python tests/measure_compile_cost.py [--backend inductor] [--size debug] [--steps 5] [--tasks ...]

Tasks: pretrain (CMAE, activation checkpointing), mae, finetune (classifier, drop-path 0.1, 12 blocks at debug
size), probe (frozen encoder, no_grad), eval (classifier, eval mode, no_grad). Each task's compiled run starts
from a reset dynamo and inductor's on-disk caches off, so its first step is a cold compile. Prints a markdown table
(docs/kernels.md, "What compiling costs and gains").
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

os.environ.setdefault('TORCHINDUCTOR_FX_GRAPH_CACHE', '0')
os.environ.setdefault('TORCHINDUCTOR_AUTOGRAD_CACHE', '0')

import torch  # noqa: E402

from cmae_ds.config import ModelConfig  # noqa: E402
from cmae_ds.engine.compile import apply_compile, compiled_graphs  # noqa: E402
from cmae_ds.kernels import configure  # noqa: E402
from cmae_ds.models import CMAE, ViTClassifier, build_probe  # noqa: E402

TASKS = ('pretrain', 'mae', 'finetune', 'probe', 'eval')


def _model(task: str, size: str, img: int, patch: int):
    depth = {'depth': 12} if task in ('finetune', 'eval') and size == 'debug' else {}
    cfg = ModelConfig(size=size, img_size=img, patch_size=patch, mode='mae' if task == 'mae' else 'cmae', **depth)
    if task in ('pretrain', 'mae'):
        model = CMAE(cfg)
        model.encoder.blocks.checkpointing = task == 'pretrain'
        return model
    if task == 'probe':
        return build_probe(cfg, 10)
    return ViTClassifier(cfg, 10, drop_path=0.1 if task == 'finetune' else 0.0)


def _step(task: str, model, opt, batch: int, img: int):
    x = torch.randn(batch, 3, img, img)
    if task == 'eval':
        with torch.no_grad():
            return model.eval()(x)
    with torch.autocast('cpu', dtype=torch.bfloat16):
        loss = model(x, x)['loss'] if task in ('pretrain', 'mae') else model(x).float().logsumexp(1).mean()
    opt.zero_grad()
    loss.backward()
    opt.step()


def measure(task: str, mode: str, args) -> dict:
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = _model(task, args.size, args.img, args.patch)
    state = apply_compile(model, mode, 'cpu', backend=args.backend)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4) if params else None
    times = []
    for _ in range(args.steps + 1):
        t0 = time.perf_counter()
        _step(task, model, opt, args.batch, args.img)
        times.append(time.perf_counter() - t0)
    graphs = compiled_graphs(state) if state.regions else {}
    return {
        'first_s': times[0],
        'step_ms': 1000 * statistics.median(times[1:]),
        'graphs': graphs,
        'fallback': state.fallback,
    }


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--backend', default='inductor')
    p.add_argument('--size', default='debug')
    p.add_argument('--img', type=int, default=64)
    p.add_argument('--patch', type=int, default=8)
    p.add_argument('--batch', type=int, default=8)
    p.add_argument('--steps', type=int, default=5)
    p.add_argument('--tasks', nargs='+', default=list(TASKS), choices=TASKS)
    args = p.parse_args(argv)
    configure(off=('recon_loss', 'visible_embed', 'ema'), environment=False)  # no Triton on a CPU
    print(
        f'torch {torch.__version__}, backend {args.backend}, {args.size} at {args.img}px/{args.patch}, '
        f'batch {args.batch}, bf16 autocast, {torch.get_num_threads()} threads'
    )
    print('| task | eager step ms | compiled step ms | gain | first compiled step s (cold) | graphs | fall-back |')
    print('|---|---|---|---|---|---|---|')
    for task in args.tasks:
        e, c = measure(task, 'eager', args), measure(task, 'blocks', args)
        print(
            f'| {task} | {e["step_ms"]:.1f} | {c["step_ms"]:.1f} | {e["step_ms"] / c["step_ms"]:.2f}x | '
            f'{c["first_s"]:.1f} | {c["graphs"]} | {c["fallback"] or "-"} |',
            flush=True,
        )


if __name__ == '__main__':
    main()
